"""``diffcirc.ops.attention``: the public entry point of the fused attention op."""

from __future__ import annotations

import torch

from . import extension
from .checks import check_and_normalise
from .reference import reference_attention
from .types import AttentionOutput


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    head_scale: torch.Tensor | None = None,
    head_replacement: torch.Tensor | None = None,
    stats=(),
    grid=None,
    labels=None,
    key_groups: torch.Tensor | None = None,
    n_groups: int | None = None,
    key_group_mass_heads: str = "each",
) -> AttentionOutput:
    """Scaled-dot-product attention with per-query statistics and per-head interventions.

    Never materialises the (Nq, Nk) attention matrix (unless the extension is missing).

    Args:
        q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv). float32, float16 or bfloat16,
            any strides (the last dim is read as contiguous).
        scale: multiplies q·k; default D ** -0.5.
        key_padding_mask: bool (B, Nk), True = attend.
        head_scale: (B, H) or (H,): each head's output is multiplied by it (0 ablates).
        head_replacement: (B|1, H, Nq|1, Dv): out_h = s * attn_h + (1 - s) * replacement_h.
        stats: subset of {"lse", "entropy", "distance", "label_mass", "key_group_mass"}.
        grid: ((hq, wq), (hk, wk)) row-major token grids, needed for "distance".
        labels: (q_labels (B, Nq), k_labels (B, Nk)) integer region ids, needed for "label_mass".
        key_groups: (B, Nk) integer group of each key in [-1, n_groups), -1 = in no group; needed
            for "key_group_mass" (e.g. each text token its own group, image keys -1). The range is
            checked for CPU tensors; on a GPU (where checking would wait for the device) and under
            torch.compile an id outside it puts its key in no group.
        n_groups: G, in [1, 65536], with key_groups.
        key_group_mass_heads: "each" (per head) or "sum": summed over heads in the kernel, so the
            output is (B, 1, Nq, G), H times smaller (what DAAM-style heatmaps keep). Summation
            order across heads is not fixed: sums may differ in the last bits between runs.

    Returns:
        AttentionOutput(out (B, H, Nq, Dv) in q's dtype, then lse, entropy, distance, label_mass:
        each (B, H, Nq) float32 or None, then key_group_mass (B, H, Nq, G) (or (B, 1, Nq, G)
        summed over heads) float32 or None: per query the attention probability on each group's
        keys, 0 on fully masked rows). ``out`` is
        differentiable w.r.t. q, k, v, head_scale and head_replacement; the statistics are not.
    """
    a = check_and_normalise(q, k, v, scale=scale, key_padding_mask=key_padding_mask, head_scale=head_scale,
                            head_replacement=head_replacement, stats=stats, grid=grid, labels=labels,
                            key_groups=key_groups, n_groups=n_groups, key_group_mass_heads=key_group_mass_heads)
    if not extension.available():
        return _fallback(a)
    out, lse, ent, dist, lab, group_mass = torch.ops.diffcirc.attention(
        a.q, a.k, a.v, a.scale, a.key_padding_mask, a.head_scale, a.head_replacement, a.grid,
        a.q_labels, a.k_labels, "entropy" in a.stats, "distance" in a.stats, "label_mass" in a.stats,
        a.key_groups, a.n_groups, a.sum_group_heads)
    return AttentionOutput(
        out,
        lse if "lse" in a.stats else None,
        ent if "entropy" in a.stats else None,
        dist if "distance" in a.stats else None,
        lab if "label_mass" in a.stats else None,
        group_mass if "key_group_mass" in a.stats else None,
    )


def _fallback(a) -> AttentionOutput:
    grid = ((a.grid[0], a.grid[1]), (a.grid[2], a.grid[3])) if a.grid else None
    labels = (a.q_labels, a.k_labels) if a.q_labels is not None else None
    ref = reference_attention(a.q, a.k, a.v, scale=a.scale, key_padding_mask=a.key_padding_mask,
                              head_scale=a.head_scale, head_replacement=a.head_replacement,
                              stats=a.stats, grid=grid, labels=labels, key_groups=a.key_groups,
                              n_groups=a.n_groups, key_group_mass_heads="sum" if a.sum_group_heads else "each")
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    return AttentionOutput(ref.out.to(a.q.dtype), f32(ref.lse), f32(ref.entropy), f32(ref.distance),
                           f32(ref.label_mass), f32(ref.key_group_mass))
