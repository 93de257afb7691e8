"""Shared test helpers: devices, dtypes and tolerances. Never queries the GPU at import time."""

import pytest
import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
