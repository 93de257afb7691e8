"""diffcirc.bench.cases: the op benchmark's random inputs."""

import pytest
import torch

from diffcirc.bench.cases import DTYPES, make_case


def test_dtype_names():
    assert DTYPES == {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


# grids by hand: int(sqrt(n)) rows when they tile n tokens exactly, else one row
@pytest.mark.parametrize("n, grid", [(64, ((8, 8), (8, 8))), (48, ((6, 8), (6, 8))), (7, ((1, 7), (1, 7)))],
                         ids=["square", "6x8", "prime"])
def test_case_shapes_grid_and_labels(n, grid):
    case = make_case(2, 3, n, 16, torch.bfloat16)
    for name in ("q", "k", "v"):
        assert case[name].shape == (2, 3, n, 16) and case[name].dtype == torch.bfloat16
    assert case["grid"] == grid
    for labels in case["labels"]:
        assert labels.shape == (2, n) and 0 <= labels.min() and labels.max() < 8


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = (make_case(1, 2, 16, 8, torch.float32, seed=s) for s in (3, 3, 4))
    assert torch.equal(a["q"], b["q"]) and torch.equal(a["labels"][1], b["labels"][1])
    assert not torch.equal(a["q"], c["q"])
    assert not torch.equal(a["q"], a["k"])  # q, k and v are three draws, not one
