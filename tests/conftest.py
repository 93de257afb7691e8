"""Fixtures shared by every test folder. Helper functions live in ``tests/helpers`` (imported as
``helpers.*``); nothing imports this file by name. Never queries the GPU at import time."""

import sys

import pytest
import torch

from diffcirc.ops import extension
from helpers import tiny_models as tm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cuda_device():
    """"cuda"; skips without a GPU, fails when the extension was built without its CUDA kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    ext = extension.load()
    assert ext is not None, "the extension must be built for the GPU tests (make build)"
    assert ext.cuda_archs(), "diffcirc._C was built without CUDA kernels (needs nvcc and a CUDA build of torch)"
    return "cuda"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Runs a test once per device, extension-cpp style: "cpu", then "cuda" (skipped without a GPU)."""
    return request.getfixturevalue("cuda_device") if request.param == "cuda" else "cpu"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread while a test module runs: these models are tiny, and on a shared machine
    two OpenMP threads contending with other jobs are slower by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    """A tiny UNet folder as save_pretrained writes it (config.json + safetensors); copied per test."""
    folder = tmp_path_factory.mktemp("unet")
    tm.unet2d().save_pretrained(folder)
    return folder


@pytest.fixture
def unet_dir(saved_unet, tmp_path):
    """A private copy of ``saved_unet`` that a test may damage."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in saved_unet.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(params=["low-memory", "full-init"])
def loading_path(request, monkeypatch):
    """Run a test under each of the loader's ways of building the model: low_cpu_mem_usage=True (on the
    meta device, no random initialisation; the default where accelerate is installed) and
    low_cpu_mem_usage=False (the fallback without accelerate)."""
    low = request.param == "low-memory"
    if low:
        pytest.importorskip("accelerate")
    monkeypatch.setattr(sys.modules["diffcirc.models.load"], "_low_memory_loading", lambda: low)
