"""Loading the compiled extension ``diffcirc._C``, once, with a single warning when it is missing."""

from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """Returns the ``diffcirc._C`` module, or None (and warns once) when it was not built."""
    try:
        from diffcirc import _C  # noqa: F401  (importing registers torch.ops.diffcirc.*)
    except ImportError as err:
        warnings.warn(
            f"diffcirc._C is not built ({err}); using the slow float64 reference implementation. "
            "Build it with `pip install --no-build-isolation -e .` or `make build`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    from . import registration  # noqa: F401  (fake impl and autograd for the compiled op)

    return _C


def available() -> bool:
    return load() is not None
