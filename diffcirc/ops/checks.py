"""Validation and normalisation of the op's arguments: one place for every user-facing message.

The compiled op re-checks what it relies on (so a direct ``torch.ops.diffcirc.attention`` call
cannot crash), but these are the messages users meet, for the extension and the fallback alike.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from .types import ALL_STAT_NAMES

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512
MAX_GROUPS = 1 << 16  # kMaxKeyGroups in csrc/attention.h, the same on every backend


@dataclass
class OpArgs:
    """Arguments in the form the kernels take (see ``csrc/attention.cpp`` for the schema)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    key_padding_mask: Optional[torch.Tensor]  # bool (B, Nk), any strides
    head_scale: Optional[torch.Tensor]  # float32 (B, H), possibly an expanded view
    head_replacement: Optional[torch.Tensor]  # float32 (B, H, Nq, Dv), possibly an expanded view
    grid: list  # [hq, wq, hk, wk] or []
    q_labels: Optional[torch.Tensor]  # int32 (B, Nq), any strides
    k_labels: Optional[torch.Tensor]  # int32 (B, Nk), any strides
    key_groups: Optional[torch.Tensor]  # int32 (B, Nk), any strides
    n_groups: int  # G, 0 without key_groups
    stats: frozenset
    sum_group_heads: bool = False  # key_group_mass summed over heads: (B, 1, Nq, G)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {_shape(t)} on {t.device}"


def normalise_stats(stats) -> frozenset:
    if isinstance(stats, str):
        stats = (stats,)
    stats = frozenset(stats)
    unknown = stats - set(ALL_STAT_NAMES)
    if unknown:
        raise ValueError(f"stats: unknown statistic(s) {sorted(unknown)}; choose from {list(ALL_STAT_NAMES)}")
    return stats


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels read rows as contiguous vectors; other strides are free (no copy).
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _is_integer_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_key_groups(key_groups, n_groups, stats: frozenset, B: int, Nk: int, device) -> tuple:
    """key_groups (B, Nk) integer ids in [-1, n_groups) (-1: in no group) and n_groups G, for the
    "key_group_mass" statistic. Returns (int32 key_groups or None, G or 0).

    The ids' range is checked where that is free: on CPU tensors outside torch.compile. On a GPU it
    would wait for the device, so there (and under torch.compile) an id outside [-1, G) is not an
    error: like -1, it puts its key in no group.
    """
    wanted = "key_group_mass" in stats
    if key_groups is None:
        if wanted:
            raise ValueError(f"stats 'key_group_mass' needs key_groups (B, Nk) = ({B}, {Nk}) and n_groups")
        if n_groups is not None:
            raise ValueError(f"n_groups = {n_groups!r} given without key_groups (B, Nk) = ({B}, {Nk})")
        return None, 0
    if not wanted:
        raise ValueError("key_groups given but stats does not ask for 'key_group_mass'")
    if not _is_integer_tensor(key_groups) or tuple(key_groups.shape) != (B, Nk):
        got = _describe(key_groups) if isinstance(key_groups, torch.Tensor) else type(key_groups).__name__
        raise ValueError(f"key_groups must be an integer tensor of shape (B, Nk) = ({B}, {Nk}), got {got}")
    if key_groups.device != device:
        raise ValueError(f"key_groups must be on {device}, got {key_groups.device}")
    if n_groups is None:
        raise ValueError("stats 'key_group_mass' needs n_groups: the number of groups G (key_groups holds ids in [-1, G))")
    try:
        if isinstance(n_groups, bool):
            raise TypeError
        G = operator.index(n_groups)
    except TypeError:
        raise ValueError(f"n_groups must be an int, got {type(n_groups).__name__} {n_groups!r}") from None
    if not 1 <= G <= MAX_GROUPS:
        raise ValueError(f"n_groups must be in [1, {MAX_GROUPS}], got {G}")
    if key_groups.device.type == "cpu" and key_groups.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(key_groups))
        if lo < -1 or hi >= G:
            raise ValueError(f"key_groups must hold ids in [-1, n_groups) = [-1, {G}), got ids from {lo} to {hi} "
                             f"in key_groups {_shape(key_groups)}")
    if key_groups.dtype != torch.int32:  # clamped first: a wide id must not wrap into [0, G)
        key_groups = key_groups.to(torch.int64).clamp(-1, G).to(torch.int32)
    return key_groups, G


KEY_GROUP_MASS_HEADS = ("each", "sum")


def check_key_group_mass_heads(heads, stats: frozenset) -> bool:
    """key_group_mass_heads "each" (B, H, Nq, G) or "sum" (B, 1, Nq, G) -> whether to sum over heads."""
    if heads not in KEY_GROUP_MASS_HEADS:
        raise ValueError(f"key_group_mass_heads must be one of {KEY_GROUP_MASS_HEADS}, got {heads!r}")
    if heads == "sum" and "key_group_mass" not in stats:
        raise ValueError("key_group_mass_heads='sum' given but stats does not ask for 'key_group_mass'")
    return heads == "sum"


def check_and_normalise(q, k, v, *, scale, key_padding_mask, head_scale, head_replacement, stats, grid, labels,
                        key_groups=None, n_groups=None, key_group_mass_heads="each") -> OpArgs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k, v must share (B, H); got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim D = {D} like q, got k {_shape(k)}")
    if v.shape[2] != Nk:
        raise ValueError(f"v must have Nk = {Nk} rows like k, got v {_shape(v)}")
    for name, dim in (("head dim D", D), ("value head dim Dv", Dv)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {dim}")
    device = q.device

    if scale is None:
        scale = D**-0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool \
                or tuple(key_padding_mask.shape) != (B, Nk):
            got = _describe(key_padding_mask) if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be bool of shape (B, Nk) = ({B}, {Nk}), got {got}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")

    if head_scale is not None:
        if not isinstance(head_scale, torch.Tensor):
            head_scale = torch.as_tensor(head_scale, dtype=torch.float32, device=device)
        if not head_scale.is_floating_point() or tuple(head_scale.shape) not in ((B, H), (H,)):
            raise ValueError(f"head_scale must be floating of shape (B, H) = ({B}, {H}) or (H,) = ({H},), got {_describe(head_scale)}")
        if head_scale.device != device:
            raise ValueError(f"head_scale must be on {device}, got {head_scale.device}")
        head_scale = head_scale.to(torch.float32).expand(B, H)

    if head_replacement is not None:
        r = head_replacement
        ok = isinstance(r, torch.Tensor) and r.is_floating_point() and r.dim() == 4 and r.shape[0] in (1, B) \
            and r.shape[1] == H and r.shape[2] in (1, Nq) and r.shape[3] == Dv
        if not ok:
            got = _describe(r) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"head_replacement must be floating of shape (B|1, H, Nq|1, Dv) = ({B}|1, {H}, {Nq}|1, {Dv}), got {got}")
        if r.device != device:
            raise ValueError(f"head_replacement must be on {device}, got {r.device}")
        head_replacement = r.to(torch.float32).expand(B, H, Nq, Dv)

    stats = normalise_stats(stats)

    grid_list: list = []
    if grid is not None:
        try:
            (hq, wq), (hk, wk) = grid
            grid_list = [int(hq), int(wq), int(hk), int(wk)]
        except (TypeError, ValueError):
            raise ValueError(f"grid must be ((hq, wq), (hk, wk)), got {grid!r}") from None
        if min(grid_list) < 1 or grid_list[0] * grid_list[1] != Nq or grid_list[2] * grid_list[3] != Nk:
            raise ValueError(f"grid {grid!r} does not match Nq = {Nq}, Nk = {Nk} (need hq*wq = Nq and hk*wk = Nk)")
    elif "distance" in stats:
        raise ValueError("stats 'distance' needs grid=((hq, wq), (hk, wk))")

    q_labels = k_labels = None
    if labels is not None:
        if not isinstance(labels, (tuple, list)) or len(labels) != 2:
            raise ValueError(f"labels must be a pair (q_labels (B, Nq), k_labels (B, Nk)), got {type(labels).__name__}")
        q_labels, k_labels = labels
        for name, t, n in (("q_labels", q_labels, Nq), ("k_labels", k_labels, Nk)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool \
                    or tuple(t.shape) != (B, n):
                got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"labels: {name} must be an integer tensor of shape ({B}, {n}), got {got}")
            if t.device != device:
                raise ValueError(f"labels: {name} must be on {device}, got {t.device}")
        q_labels = q_labels.to(torch.int32)  # compared as int32 in the kernels
        k_labels = k_labels.to(torch.int32)
    elif "label_mass" in stats:
        raise ValueError("stats 'label_mass' needs labels=(q_labels (B, Nq), k_labels (B, Nk))")

    key_groups, n_groups = check_key_groups(key_groups, n_groups, stats, B, Nk, device)
    sum_group_heads = check_key_group_mass_heads(key_group_mass_heads, stats)

    return OpArgs(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), scale,
                  key_padding_mask, head_scale, head_replacement, grid_list, q_labels, k_labels, key_groups,
                  n_groups, stats, sum_group_heads)
