"""diffcirc: fused attention with in-kernel statistics and head interventions for diffusion models.

The op (``diffcirc.ops.attention``) never materialises an N x N attention map; the processor layer
swaps it into diffusers models; the analysis layer runs circuit studies on top.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402

# The diffusers-facing names load lazily so that `import diffcirc` stays light.
_LAZY = {"FusedAttnProcessor": "diffcirc.processor", "Session": "diffcirc.processor", "Recorder": "diffcirc.processor"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffcirc' has no attribute {name!r}")


__all__ = ["ops", "__version__", *_LAZY]
