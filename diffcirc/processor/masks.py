"""Turning diffusers' attention masks into the op's per-key padding mask.

diffusers hands attention processors either a boolean mask (True = attend) or an additive bias
(0 = attend, a large negative number such as -10000 = ignore; ``UNet2DConditionModel`` builds
``(1 - encoder_attention_mask) * -10000``). After ``attn.prepare_attention_mask`` and the view
that ``AttnProcessor2_0`` applies, the mask has shape (B, H, L, Nk) with L in {1, Nq}.

The op can only express a mask that depends on the batch element and the key, so we accept a
prepared mask when it is the same for every head and every query, and when an additive mask only
holds "attend" values (the row maximum) and "ignore" values (at least ``HARD_MASK_GAP`` below
it). Anything else (a query-dependent or head-dependent mask, a soft bias) raises ValueError.
"""

from __future__ import annotations

import torch

# exp(-1000) underflows to 0 even in float64, so a bias this far below the row maximum removes
# the key exactly as SDPA's softmax does; smaller gaps are soft biases the op cannot express.
HARD_MASK_GAP = 1000.0


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def key_padding_mask_from_attention_mask(mask: torch.Tensor, batch: int, heads: int, n_keys: int) -> torch.Tensor:
    """Bool (B, Nk) mask, True = attend, from diffusers' prepared mask.

    Args:
        mask: (B, H, L, Nk), L = 1 or Nq, bool (True = attend) or floating (additive bias), as
            ``AttnProcessor2_0`` passes it to SDPA.
        batch, heads, n_keys: B, H and Nk of the attention call, for the error messages.

    An additive row whose keys are all "ignored" by the same amount is a constant shift, which
    softmax removes, so it becomes all True (diffusers attends uniformly there as well); a row of
    only -inf becomes all False (the op then outputs 0, where SDPA would give NaN).
    """
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != heads or mask.shape[-1] != n_keys:
        raise ValueError(
            f"attention_mask: after prepare_attention_mask expected shape (B, H, 1, Nk) = ({batch}, {heads}, 1, "
            f"{n_keys}), got {_shape(mask)}; diffcirc supports per-key padding masks only")
    first = mask[:, :1, :1, :]  # (B, 1, 1, Nk)
    if mask.shape[1] * mask.shape[2] > 1 and not torch.equal(mask, first.expand_as(mask)):
        raise ValueError(
            f"attention_mask of shape {_shape(mask)} differs between heads or queries; the fused op only "
            "supports per-key padding masks (B, Nk); use diffusers' AttnProcessor2_0 for this layer")
    row = first[:, 0, 0, :]  # (B, Nk)
    if row.dtype == torch.bool:
        return row.contiguous()
    if not row.is_floating_point():
        raise ValueError(f"attention_mask must be bool or floating, got {row.dtype}")
    top = row.amax(dim=-1, keepdim=True)  # (B, 1)
    keep = row == top
    hard = keep | (row <= top - HARD_MASK_GAP)
    if not bool(hard.all()):
        bad = row[~hard][0].item()
        raise ValueError(
            f"attention_mask holds a soft additive bias ({bad} where the row maximum is {top.max().item()}); "
            f"the fused op only supports hard masks (0 or <= -{HARD_MASK_GAP:g}, or bool)")
    return keep & torch.isfinite(top)
