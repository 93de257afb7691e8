"""Loading the compiled extension ``diffcirc._C``, once, with a single warning when it is missing."""

from __future__ import annotations

import os
import warnings

import torch

_NOT_TRIED = object()
_module = _NOT_TRIED

# The warnings point at the caller of ``diffcirc.ops.attention``: _import <- load <- available <- attention.
_CALLER_OF_ATTENTION = 5


def _import():
    if os.environ.get("DIFFCIRC_DISABLE_EXTENSION") == "1":
        warnings.warn("DIFFCIRC_DISABLE_EXTENSION=1: using the slow float64 reference implementation",
                      RuntimeWarning, stacklevel=_CALLER_OF_ATTENTION)
        return None
    try:
        from diffcirc import _C  # noqa: F401  (importing registers torch.ops.diffcirc.*)
    except ImportError as err:
        warnings.warn(
            f"diffcirc._C is not built ({err}); using the slow float64 reference implementation. "
            "Build it with `pip install --no-build-isolation -e .` or `make build`.",
            RuntimeWarning,
            stacklevel=_CALLER_OF_ATTENTION,
        )
        return None
    from . import registration  # noqa: F401  (fake impl and autograd for the compiled op)

    return _C


def load():
    """Returns the ``diffcirc._C`` module, or None (and warns once) when it was not built.

    DIFFCIRC_DISABLE_EXTENSION=1 forces the reference path (for comparisons and debugging).
    """
    global _module
    if _module is _NOT_TRIED:
        _module = _import()
    return _module


# torch.compile runs this once while tracing and keeps the answer as a constant: tracing ``load``
# itself would guard on the ``_module`` marker, which the first call changes, so the second call
# would recompile. The answer cannot change within a process, which makes the constant safe.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether ``diffcirc._C`` is loaded (loading it, or warning once, on the first call)."""
    return load() is not None
