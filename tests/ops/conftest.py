import pytest

from diffcirc.ops import extension

CPU_ISAS = ("avx512", "avx2", "scalar")


@pytest.fixture(params=[*CPU_ISAS, pytest.param("cuda", marks=pytest.mark.cuda)])
def kernel(request):
    """Runs a test once per path of the compiled kernel and yields its device: the CPU kernel capped at
    each instruction set (skipped where this CPU lacks it), then the CUDA kernel (skipped without a GPU)."""
    if request.param == "cuda":
        yield request.getfixturevalue("cuda_device")
        return
    ext = extension.load()
    assert ext is not None, "the extension must be built for these tests (make build)"
    before = ext.cpu_isa()
    try:
        ext.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU lacks {request.param}")  # a hardware limit, not a missing feature
    yield "cpu"
    ext.set_cpu_isa(before)
