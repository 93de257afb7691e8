"""Result type of the fused attention op."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

STAT_NAMES = ("lse", "entropy", "distance", "label_mass")


class AttentionOutput(NamedTuple):
    """out: (B, H, Nq, Dv) in q's dtype; each statistic (B, H, Nq) float32, or None when not asked for."""

    out: torch.Tensor
    lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    distance: Optional[torch.Tensor] = None
    label_mass: Optional[torch.Tensor] = None
