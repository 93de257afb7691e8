"""pytest-benchmark regression suite for the attention op (small shapes; not part of `make test`).

    pytest benchmarks/test_perf.py --benchmark-only
    pytest benchmarks/test_perf.py --benchmark-only --benchmark-autosave          # keep a baseline
    pytest benchmarks/test_perf.py --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each implementation is checked against the float64 reference before it is benchmarked; the timing
itself is never asserted."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcirc.bench import harness  # noqa: E402

SHAPES = [(1, 4, 256, 64), (1, 4, 1024, 64)]
IMPLS = ["fused", "fused+entropy", "fused+all stats", "sdpa", "materialising"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DIFFCIRC_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, shape, dt):
    fn = harness.IMPLEMENTATIONS[impl]
    dtype = harness.DTYPES[dt]
    case = harness.make_case(*shape, dtype)
    harness.check(impl, fn, case, dtype)  # refuse a wrong implementation before timing
    b, h, n, d = shape
    benchmark.extra_info.update(flops=4 * b * h * n * n * d, implementation=impl, dtype=dt)
    benchmark.group = f"{dt} {'x'.join(map(str, shape))}"
    benchmark.pedantic(fn, args=(case,), rounds=5, iterations=1, warmup_rounds=1)
