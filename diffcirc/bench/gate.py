"""The correctness gate: every implementation is checked before it is timed, and one that
disagrees with the reference is refused (IncorrectImplementation), never timed."""

from __future__ import annotations

import torch

from diffcirc.ops import reference_attention

# max abs error of the op's out and entropy against the float64 reference, per dtype
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}
# max abs error of a model's output against the same model under diffusers' own processors
MODEL_TOLERANCE = 1e-3


class IncorrectImplementation(AssertionError):
    """An implementation's output disagrees with the reference; it is refused before timing."""


def _first_head(t: torch.Tensor) -> torch.Tensor:
    return t[:1, :1]


def reference(case: dict):
    """The float64 reference (out and entropy) on (b=0, h=0) of a case (cases.make_case)."""
    q, k, v = (_first_head(case[name]) for name in ("q", "k", "v"))
    return reference_attention(q, k, v, stats=("entropy",))


def check(name: str, fn, case: dict, dtype: torch.dtype, ref=None) -> float:
    """Max abs error of fn(case)'s out (and entropy) on (b=0, h=0) against the float64 reference
    (computed here unless given); raises IncorrectImplementation past the dtype's tolerance. Calls
    fn exactly once."""
    out, entropy = fn(case)
    ref = reference(case) if ref is None else ref
    errors = [(_first_head(out).double() - ref.out).abs().max()]
    if entropy is not None:
        errors.append((_first_head(entropy).double() - ref.entropy).abs().max())
    err = torch.stack(errors).max().item()  # torch's max keeps a nan, where Python's max(err, nan) drops it
    tol = TOLERANCES[dtype]
    if not err <= tol:  # a nan error passes no comparison: refused too
        raise IncorrectImplementation(f"{name}: max error {err:.3g} against the float64 reference exceeds {tol}")
    return err
