"""Which diffusers attention processors diffcirc replaces, and with what.

``FUSED_COUNTERPARTS`` maps each supported processor class to a factory of its fused counterpart:
a processor on diffcirc's op that reproduces it step for step (fp32, within 1e-5 relative, on
tiny models of every kind; ``tests/processor/test_supported.py``). A ``Session`` installs the
counterpart of each layer's processor and refuses (or, when asked, leaves alone) every layer
whose processor is not in the map, because replacing it would change the model's output.

Classes match exactly, never through ``isinstance``: a subclass may change any step (an
IP-adapter processor, a user's variant of ``AttnProcessor2_0``), so it is not assumed to be
supported. A counterpart for another processor (joint attention, Flux, ...) is one entry here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .processor import Controller, FusedAttnProcessor

# diffusers' attention modules: the classic ``Attention`` and the newer per-model classes
# (``FluxAttention``, ...) built on ``AttentionModuleMixin``, which ``Attention`` does not derive from.
ATTENTION_MODULES = (Attention, AttentionModuleMixin)

# factory(layer, controller, replaced processor) -> the counterpart to install on that layer
Factory = Callable[[str, Controller, object], object]


def _fused(scale_rule: str) -> Factory:
    return lambda layer, controller, replaced: FusedAttnProcessor(layer, controller, scale_rule=scale_rule)


FUSED_COUNTERPARTS: dict = {
    AttnProcessor2_0: _fused("head_dim"),
    AttnProcessor: _fused("attn"),
    # a drop-in FusedAttnProcessor already in place (a user's, or another session's) keeps its scale rule
    FusedAttnProcessor: lambda layer, controller, replaced: FusedAttnProcessor(
        layer, controller, scale_rule=replaced.scale_rule),
}


def supported_names() -> list:
    """Names of the supported processor classes, for messages and the README."""
    return [cls.__name__ for cls in FUSED_COUNTERPARTS]


def attention_modules(model: torch.nn.Module) -> dict:
    """{module path: module} of every diffusers attention module in model, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_MODULES)}


def counterpart(processor) -> Optional[Factory]:
    """The factory of processor's fused counterpart, or None when its class has none."""
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
