"""pytest-benchmark regression suite for the attention op (small shapes; not part of `make test`).

    pytest benchmarks/test_perf.py --benchmark-only
    pytest benchmarks/test_perf.py --benchmark-only --benchmark-autosave          # keep a baseline
    pytest benchmarks/test_perf.py --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each implementation is checked against the float64 reference before it is benchmarked; the timing
itself is never asserted."""

import os

import pytest
import torch

from diffcirc.bench.cases import DTYPES, make_case
from diffcirc.bench.gate import check
from diffcirc.bench.implementations import IMPLEMENTATIONS

SHAPES = [(1, 4, 256, 64), (1, 4, 1024, 64)]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DIFFCIRC_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_attention(benchmark, impl, shape, dt):
    fn = IMPLEMENTATIONS[impl]
    dtype = DTYPES[dt]
    case = make_case(*shape, dtype)
    check(impl, fn, case, dtype)  # refuse a wrong implementation before timing
    b, h, n, d = shape
    benchmark.extra_info.update(flops=4 * b * h * n * n * d, implementation=impl, dtype=dt)
    benchmark.group = f"{dt} {'x'.join(map(str, shape))}"
    benchmark.pedantic(fn, args=(case,), rounds=5, iterations=1, warmup_rounds=1)
