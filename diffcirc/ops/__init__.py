"""The fused attention op: ``attention`` (kernels in ``csrc/``), its float64 ``reference_attention``."""

from .attention import attention
from .reference import grid_coordinates, reference_attention
from .types import ALL_STAT_NAMES, GROUP_STAT_NAMES, STAT_NAMES, AttentionOutput

__all__ = ["attention", "reference_attention", "grid_coordinates", "AttentionOutput", "STAT_NAMES",
           "GROUP_STAT_NAMES", "ALL_STAT_NAMES"]
