import pytest
import torch

from diffcirc.ops import extension

CPU_ISAS = ("avx512bf16", "avx512", "avx2", "scalar")
THREADS = 4  # the kernels' several-thread tests: more threads than tasks per thread on two cores


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    """One intra-op thread for the op tests (see ``single_thread``): their float64 oracles run many
    small ops, each a parallel region that waits for a descheduled second thread on a busy machine.
    The kernels' split of tasks over threads is tested on ``THREADS`` threads (``several_threads``)."""


@pytest.fixture
def several_threads():
    """``THREADS`` intra-op threads for one test, then one again: the CPU kernel's tasks (128 query
    rows of one head) spread over threads, each reusing its tiles over several of them, and tasks of
    different heads adding into the same rows under a lock (key-group mass summed over heads)."""
    torch.set_num_threads(THREADS)
    try:
        assert torch.get_num_threads() == THREADS
        yield THREADS
    finally:
        torch.set_num_threads(1)


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
