"""Which diffusers attention processors diffcirc replaces, and with what.

``FUSED_COUNTERPARTS`` maps each supported processor class to a factory of its fused counterpart:
a processor on diffcirc's op that reproduces it step for step (fp32, within 1e-5 relative, on
tiny models of every kind; ``tests/processor/test_supported.py``). A ``Session`` installs the
counterpart of each layer's processor and refuses (or, when asked, leaves alone) every layer
whose processor is not in the map, because replacing it would change the model's output.

Classes match exactly, never through ``isinstance``: a subclass may change any step (an
IP-adapter processor, a user's variant of ``AttnProcessor2_0``), so it is not assumed to be
supported. A counterpart for another processor is one entry here: a ``Counterpart`` with the
factory and the kind of the layers it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0, AuraFlowAttnProcessor2_0,
                                                  JointAttnProcessor2_0)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .counterparts import (FusedAuraFlowAttnProcessor, FusedFluxAttnProcessor, FusedJointAttnProcessor,
                           FusedSanaAttnProcessor)
from .processor import Controller, FusedAttnProcessor

# diffusers' attention modules: the classic ``Attention`` and the newer per-model classes
# (``FluxAttention``, ...) built on ``AttentionModuleMixin``, which ``Attention`` does not derive from.
ATTENTION_MODULES = (Attention, AttentionModuleMixin)

# factory(layer, controller, replaced processor) -> the counterpart to install on that layer
Factory = Callable[[str, Controller, object], object]


@dataclass(frozen=True)
class Counterpart:
    """build: the factory; kind(module) -> "self" | "cross" | "joint", what the module's layer is."""

    build: Factory
    kind: Callable[[torch.nn.Module], str]


def _self_or_cross(module) -> str:
    return "cross" if module.is_cross_attention else "self"


def _fused(scale_rule: str) -> Counterpart:
    return Counterpart(lambda layer, controller, replaced: FusedAttnProcessor(layer, controller, scale_rule=scale_rule),
                       _self_or_cross)


def _of(cls) -> Counterpart:
    return Counterpart(cls.for_layer, cls.layer_kind)


_TRANSFORMER_COUNTERPARTS = {
    JointAttnProcessor2_0: FusedJointAttnProcessor,
    FluxAttnProcessor: FusedFluxAttnProcessor,
    AuraFlowAttnProcessor2_0: FusedAuraFlowAttnProcessor,
    SanaAttnProcessor2_0: FusedSanaAttnProcessor,
}

FUSED_COUNTERPARTS: dict = {
    AttnProcessor2_0: _fused("head_dim"),
    AttnProcessor: _fused("attn"),
    # a drop-in counterpart already in place (a user's, or another session's) is replaced by its
    # like; FusedAttnProcessor keeps its scale rule
    FusedAttnProcessor: Counterpart(lambda layer, controller, replaced: FusedAttnProcessor(
        layer, controller, scale_rule=replaced.scale_rule), _self_or_cross),
    **{processor: _of(fused) for processor, fused in _TRANSFORMER_COUNTERPARTS.items()},
    **{fused: _of(fused) for fused in _TRANSFORMER_COUNTERPARTS.values()},
}


def supported_names() -> list:
    """Names of the supported processor classes, for messages and the README."""
    return [cls.__name__ for cls in FUSED_COUNTERPARTS]


def attention_modules(model: torch.nn.Module) -> dict:
    """{module path: module} of every diffusers attention module in model, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_MODULES)}


def counterpart(processor) -> Optional[Counterpart]:
    """processor's fused counterpart, or None when its class has none."""
    return FUSED_COUNTERPARTS.get(type(processor))


def unsupported_layers(modules: dict) -> dict:
    """{module path: processor class} of the modules whose processor has no fused counterpart."""
    return {name: type(m.processor) for name, m in modules.items() if counterpart(m.processor) is None}


def describe_unsupported(layers: dict, limit: int = 6) -> str:
    """"name (ProcessorClass), ..." for {module path: processor class}, the first limit of them named."""
    named = [f"{name} ({cls.__name__})" for name, cls in list(layers.items())[:limit]]
    if len(layers) > limit:
        named.append(f"and {len(layers) - limit} more")
    return ", ".join(named)
