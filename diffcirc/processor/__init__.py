"""diffusers integration: the drop-in ``FusedAttnProcessor``, ``Session`` (layers, trace, intervene),
``Recorder`` (streaming statistics), per-head interventions, batched conditions and attribution.

Modules: processor (the processor), counterparts (those of SD3, Flux, AuraFlow and Sana), supported (diffusers processor class -> fused counterpart), masks (diffusers masks -> key padding masks), grid (token
grids, label resampling), session, recorder (tag keying and dispatch) with aggregates (Welford /
Chan moments, histograms), recorder_distributed (all_reduce) and recorder_frames (its tables),
heatmaps (token heatmaps from key-group mass), interventions, conditions (run_conditions), attribution
(head_attribution).
"""

from .attribution import head_attribution, integrated_head_attribution
from .conditions import run_conditions
from .counterparts import (FusedAuraFlowAttnProcessor, FusedFluxAttnProcessor, FusedJointAttnProcessor,
                           FusedSanaAttnProcessor)
from .heatmaps import TokenHeatmaps
from .interventions import (Intervention, Mean, Patch, Scale, Uniform, Zero, cache_head_outputs, head_arguments,
                            mean_head_outputs)
from .processor import AttentionCall, FusedAttnProcessor, OpRequest
from .recorder import Recorder
from .session import LayerInfo, Session, SkippedLayer
from .supported import FUSED_COUNTERPARTS

__all__ = [
    "FusedAttnProcessor", "AttentionCall", "OpRequest",
    "FusedJointAttnProcessor", "FusedFluxAttnProcessor", "FusedAuraFlowAttnProcessor", "FusedSanaAttnProcessor",
    "Session", "LayerInfo", "SkippedLayer", "FUSED_COUNTERPARTS",
    "Recorder", "TokenHeatmaps",
    "Intervention", "Zero", "Scale", "Mean", "Patch", "Uniform", "head_arguments",
    "cache_head_outputs", "mean_head_outputs",
    "run_conditions",
    "head_attribution", "integrated_head_attribution",
]
