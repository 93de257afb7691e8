"""Shared test helpers: devices, dtypes and tolerances. Never queries the GPU at import time."""

import pytest
import torch

# name -> torch dtype, the benchmark harness's mapping ("f32", "bf16", "f16"): also the test ids
from diffcirc.bench.harness import DTYPES  # noqa: F401


def cuda_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
