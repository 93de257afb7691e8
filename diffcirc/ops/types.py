"""Result type of the fused attention op and the names of its statistics."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Per-query statistics, each (B, H, Nq).
STAT_NAMES = ("lse", "entropy", "distance", "label_mass")
# Per-query, per-group statistics, each (B, H, Nq, G).
GROUP_STAT_NAMES = ("key_group_mass",)
ALL_STAT_NAMES = STAT_NAMES + GROUP_STAT_NAMES


class AttentionOutput(NamedTuple):
    """out: (B, H, Nq, Dv) in q's dtype; lse, entropy, distance, label_mass: (B, H, Nq) float32;
    key_group_mass: (B, H, Nq, G) float32, or (B, 1, Nq, G) summed over heads. A statistic that was
    not asked for is None."""

    out: torch.Tensor
    lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    distance: Optional[torch.Tensor] = None
    label_mass: Optional[torch.Tensor] = None
    key_group_mass: Optional[torch.Tensor] = None
