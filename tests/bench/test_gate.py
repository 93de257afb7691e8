"""diffcirc.bench.gate: the check every implementation passes before it is timed."""

import math

import pytest
import torch

from diffcirc.bench.cases import make_case
from diffcirc.bench.gate import IncorrectImplementation, check, reference


def _plain_attention(c):
    """softmax(q k^T / sqrt(D)) v and its entropy, in float64: right to rounding."""
    q, k, v = (c[t].double() for t in ("q", "k", "v"))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).float(), -(p * p.log()).sum(-1).float()


def test_reference_is_the_first_head_in_float64():
    case = make_case(2, 3, 16, 8, torch.float32)
    ref = reference(case)
    out, entropy = _plain_attention(case)
    assert ref.out.shape == (1, 1, 16, 8) and ref.out.dtype == torch.float64
    assert torch.allclose(ref.out, out[:1, :1].double(), atol=1e-6)
    assert torch.allclose(ref.entropy, entropy[:1, :1].double(), atol=1e-6)


def test_a_right_implementation_passes_with_its_error():
    case = make_case(1, 2, 16, 8, torch.float32)
    err = check("plain", _plain_attention, case, torch.float32)
    assert 0 <= err < 1e-6


@pytest.mark.parametrize("error", [2e-3, float("nan")], ids=["past-tolerance", "nan"])
def test_wrong_output_or_entropy_is_refused(error):
    """f32 tolerance 1e-3: an error of 2e-3 in out, or in the entropy alone, is refused; so is a
    nan, which passes no comparison."""
    case = make_case(1, 2, 16, 8, torch.float32)

    def wrong_out(c):
        out, entropy = _plain_attention(c)
        return out + error, entropy

    def wrong_entropy(c):
        out, entropy = _plain_attention(c)
        return out, entropy + error

    for fn in (wrong_out, wrong_entropy):
        with pytest.raises(IncorrectImplementation, match=fn.__name__):
            check(fn.__name__, fn, case, torch.float32)


def test_the_dtype_sets_the_tolerance():
    case = make_case(1, 1, 16, 8, torch.bfloat16)

    def off_by(c):  # 5e-2: inside bf16's 6e-2, outside f32's 1e-3
        out, entropy = _plain_attention(c)
        return out + 5e-2, entropy

    assert check("off", off_by, case, torch.bfloat16) == pytest.approx(5e-2, rel=1e-3)
    with pytest.raises(IncorrectImplementation):
        check("off", off_by, case, torch.float32)
