"""Pure-PyTorch reference of the fused attention op.

It materialises the (Nq, Nk) probability matrix in float64, so it is slow and memory-hungry
by design: it is the test oracle, and the fallback when the compiled extension is missing.
Definitions follow DESIGN.md ("The op").
"""

from __future__ import annotations

import math

import torch

from .types import AttentionOutput


def grid_coordinates(h: int, w: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """Centres of an (h, w) token grid in [0, 1]^2, row-major like diffusers' flattening.

    Returns: (h * w, 2) with columns (row, col) = ((r + 0.5) / h, (c + 0.5) / w).
    """
    n = torch.arange(h * w, device=device)
    r = torch.div(n, w, rounding_mode="floor").to(dtype)
    c = (n % w).to(dtype)
    return torch.stack(((r + 0.5) / h, (c + 0.5) / w), dim=-1)


def group_mass(p: torch.Tensor, key_groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Probability mass of each key group: sum over keys j of group g of p_ij.

    p: (B, H, Nq, Nk); key_groups: (B, Nk) integer ids, those outside [0, n_groups) in no group.
    Returns (B, H, Nq, n_groups) in p's dtype (a NaN row of p gives a NaN row).
    """
    in_range = (key_groups >= 0) & (key_groups < n_groups)
    ids = torch.where(in_range, key_groups, n_groups).long()
    one_hot = torch.nn.functional.one_hot(ids, n_groups + 1)[..., :n_groups].to(p.dtype)  # (B, Nk, G)
    return torch.einsum("bhij,bjg->bhig", p, one_hot)


def label_mass_from_groups(p: torch.Tensor, q_labels: torch.Tensor, k_labels: torch.Tensor) -> torch.Tensor:
    """Same-label mass sum_j p_ij [label_k(j) = label_q(i)]: key-group mass with one group per label
    value, read at the query's own label. p: (B, H, Nq, Nk); labels (B, Nq), (B, Nk). Returns (B, H, Nq)."""
    B, H, Nq, _ = p.shape
    _, dense = torch.unique(torch.cat((q_labels, k_labels), dim=1), return_inverse=True)  # ids 0 .. U - 1
    n_labels = int(dense.max()) + 1 if dense.numel() else 1
    mass = group_mass(p, dense[:, Nq:], n_labels)  # (B, H, Nq, U)
    return mass.gather(-1, dense[:, None, :Nq, None].expand(B, H, Nq, 1)).squeeze(-1)


def reference_attention(
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
    key_groups=None,
    n_groups=None,
    key_group_mass_heads: str = "each",
) -> AttentionOutput:
    """Float64 attention with statistics; differentiable through plain autograd.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); key_groups (B, Nk) ids (outside
    [0, n_groups): in no group).
    Returns float64 tensors: out (B, H, Nq, Dv), stats (B, H, Nq) and key_group_mass (B, H, Nq, G)
    (B, 1, Nq, G) with key_group_mass_heads="sum"), or None when not asked for. Arguments are assumed valid (the public wrapper checks them).
    """
    stats = set(stats)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    s = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].bool()
        s = torch.where(keep, s, torch.full_like(s, -math.inf))
    else:
        keep = torch.ones_like(s, dtype=torch.bool)
    row_valid = keep.expand_as(s).any(dim=-1)  # (B, H, Nq); False for fully masked rows
    m = torch.where(row_valid, s.amax(dim=-1), torch.zeros_like(row_valid, dtype=s.dtype))
    e = torch.where(keep, torch.exp(s - m[..., None]), torch.zeros_like(s))
    denom = e.sum(dim=-1)
    p = e / torch.where(row_valid, denom, torch.ones_like(denom))[..., None]  # rows of 0 when fully masked

    out = p @ v64
    if head_scale is not None or head_replacement is not None:
        b, h = q.shape[:2]
        sc = torch.ones(b, h, dtype=torch.float64, device=q.device)
        if head_scale is not None:
            sc = sc * head_scale.double().expand(b, h)
        sc = sc[:, :, None, None]
        if head_replacement is not None:
            out = sc * out + (1 - sc) * head_replacement.double()
        else:
            out = sc * out

    def masked_mean(x):
        return torch.where(row_valid, (p * x).sum(dim=-1), torch.zeros_like(denom))

    lse = entropy = distance = label_mass = key_group_mass = None
    if "lse" in stats:
        lse = torch.where(row_valid, m + torch.log(denom), torch.full_like(denom, -math.inf))
    if "entropy" in stats:
        logp = torch.where(p > 0, torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        entropy = masked_mean(-logp)
    if "distance" in stats:
        (hq, wq), (hk, wk) = grid
        gq = grid_coordinates(hq, wq, q.device)
        gk = grid_coordinates(hk, wk, q.device)
        dist = torch.cdist(gq, gk)  # (Nq, Nk)
        distance = masked_mean(dist)
    if "label_mass" in stats:
        label_mass = label_mass_from_groups(p, *labels)  # p is 0 on fully masked rows: so is the mass
    if "key_group_mass" in stats:
        key_group_mass = group_mass(p, key_groups, n_groups)
        if key_group_mass_heads == "sum":
            key_group_mass = key_group_mass.sum(dim=1, keepdim=True)
    return AttentionOutput(out, lse, entropy, distance, label_mass, key_group_mass)
