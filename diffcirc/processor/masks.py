"""Turning diffusers' attention masks into the op's per-key padding mask.

diffusers hands attention processors either a boolean mask (True = attend) or an additive bias
(0 = attend, a large negative number such as -10000 = ignore; ``UNet2DConditionModel`` builds
``(1 - encoder_attention_mask) * -10000``). After ``attn.prepare_attention_mask`` and the view
that ``AttnProcessor2_0`` applies, the mask has shape (B, H, L, Nk) with L in {1, Nq}.

The op can only express a mask that depends on the batch element and the key, so we accept a
prepared mask when it is the same for every head and every query, and when an additive mask only
holds "attend" values (the row maximum) and "ignore" values (at least ``HARD_MASK_GAP`` below
it). Anything else (a causal or other query-dependent mask, a head-dependent mask, a soft bias)
is refused.

Those two conditions depend on the mask's values. Run eagerly they raise ValueError with the
values that broke them. Under ``torch.compile`` a Python branch on tensor data would break the
graph (``fullgraph=True`` fails), so there they become in-graph assertions
(``torch._assert_async``: a RuntimeError on the CPU, a device-side assert on a GPU) with the
same message, less the values.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# exp(-1000) underflows to 0 even in float64, so a bias this far below the row maximum removes
# the key exactly as SDPA's softmax does; smaller gaps are soft biases the op cannot express.
HARD_MASK_GAP = 1000.0


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require(ok: torch.Tensor, message: str, values: Optional[Callable[[], str]] = None) -> None:
    """Refuses unless ok (a bool scalar tensor) holds; values() adds the offending values, eagerly only."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message if values is None else f"{message} ({values()})")


def key_padding_mask_from_attention_mask(mask: torch.Tensor, batch: int, heads: int, n_keys: int,
                                         layer: Optional[str] = None) -> torch.Tensor:
    """Bool (B, Nk) mask, True = attend, from diffusers' prepared mask.

    Args:
        mask: (B, H, L, Nk), L = 1 or Nq, bool (True = attend) or floating (additive bias), as
            ``AttnProcessor2_0`` passes it to SDPA.
        batch, heads, n_keys: B, H and Nk of the attention call, for the error messages.
        layer: module path of the attention layer, named in the error messages when given.

    An additive row whose keys are all "ignored" by the same amount is a constant shift, which
    softmax removes, so it becomes all True (diffusers attends uniformly there as well); a row of
    only -inf becomes all False (the op then outputs 0, where SDPA would give NaN).
    """
    where = f"layer {layer!r}: " if layer is not None else ""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != heads or mask.shape[-1] != n_keys:
        raise ValueError(
            f"{where}attention_mask: after prepare_attention_mask expected shape (B, H, 1, Nk) = ({batch}, {heads}, "
            f"1, {n_keys}), got {_shape(mask)}; diffcirc supports per-key padding masks only")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{where}attention_mask must be bool or floating, got {mask.dtype}")
    first = mask[:, :1, :1, :]  # (B, 1, 1, Nk)
    if mask.shape[1] * mask.shape[2] > 1:
        _require((mask == first).all(),
                 f"{where}attention_mask of shape {_shape(mask)} differs between heads or queries (a causal or "
                 "other query-dependent mask); causal and arbitrary masks are not supported: the fused op takes "
                 "per-key padding masks (B, Nk) only")
    row = first[:, 0, 0, :]  # (B, Nk)
    if row.dtype == torch.bool:
        return row.contiguous()
    top = row.amax(dim=-1, keepdim=True)  # (B, 1)
    keep = row == top
    hard = keep | (row <= top - HARD_MASK_GAP)
    _require(hard.all(),
             f"{where}attention_mask holds a soft additive bias; the fused op only supports hard masks "
             f"(0 or <= -{HARD_MASK_GAP:g} below the row maximum, or bool)",
             lambda: f"{row[~hard][0].item()} where the row maximum is {top.max().item()}")
    return keep & torch.isfinite(top)
