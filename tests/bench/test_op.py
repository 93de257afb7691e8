"""diffcirc.bench.op: ordering of timings, the correctness gate before timing, the memory budget,
shapes and their defaults, the cost summary. Tiny shapes only; no wall-clock limits."""

import time

import pytest
import torch

from diffcirc.bench import implementations, op
from diffcirc.bench.gate import IncorrectImplementation

SHAPE = (1, 1, 32, 16)


def _quiet(*args):
    """A log that drops the table lines."""


def _counting(fn):
    def run(c):
        run.calls += 1
        return fn(c)
    run.calls = 0
    return run


def _slow(c):
    time.sleep(0.1)
    return implementations.sdpa(c)


def _wrong(c):
    out, _ = implementations.sdpa(c)
    return out + 0.5, None


def test_slow_implementation_is_reported_slower():
    rows = op.run_op([SHAPE], ["f32"], {"fast": implementations.sdpa, "slow": _slow}, repeats=3, log=_quiet)
    # the fastest of the repeats: the machine may be shared, and a stall only ever adds time
    fastest = {r["implementation"]: r["ms_min"] for r in rows}
    assert fastest["slow"] > fastest["fast"]
    assert fastest["slow"] >= 100.0  # the sleep is inside every timed call


def test_wrong_implementation_is_refused_before_timing():
    wrong = _counting(_wrong)
    with pytest.raises(IncorrectImplementation, match="wrong"):
        op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa, "wrong": wrong}, repeats=3, log=_quiet)
    assert wrong.calls == 1  # the check only: no warm-up, no timed calls


def test_materialising_skipped_over_memory_budget():
    mat = _counting(implementations.materialising)
    rows = op.run_op([SHAPE], ["f32"], {"materialising": mat}, mem_budget=1024, log=_quiet)
    assert mat.calls == 0 and "budget" in rows[0]["skipped"] and "ms" not in rows[0]


def test_materialising_bytes_by_hand():
    # 3 buffers of (2, 8, 1024, 1024) bf16 = 3 * 2 * 8 * 2**20 * 2 bytes = 96 MiB
    assert op.materialising_bytes(2, 8, 1024, 64, torch.bfloat16) == 96 * 2**20


def test_rows_carry_gflops_and_the_ratio_to_sdpa():
    rows = op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa, "twice": lambda c: (_slow(c), _slow(c))[0]},
                     repeats=1, log=_quiet)
    by_name = {r["implementation"]: r for r in rows}
    b, h, n, d = SHAPE
    for r in rows:
        assert r["gflops"] == pytest.approx(4 * b * h * n * n * d / (r["ms"] * 1e-3) / 1e9)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert by_name["sdpa"]["vs_sdpa"] == 1.0
    assert by_name["twice"]["vs_sdpa"] == pytest.approx(by_name["twice"]["ms"] / by_name["sdpa"]["ms"])


def test_parse_shape():
    assert op.parse_shape("2x8x1024x64", 1, 1) == (2, 8, 1024, 64)
    assert op.parse_shape("4096x40", 2, 8) == (2, 8, 4096, 40)
    assert op.parse_shape("512", 1, 2) == (1, 2, 512, 64)
    with pytest.raises(ValueError):
        op.parse_shape("1x2x3", 1, 1)


def test_default_shapes():
    assert op.default_shapes("cpu", 2, 8) == [(2, 8, n, d) for n in (1024, 4096) for d in (40, 64, 160)]
    assert op.default_shapes("cuda", 1, 4) == [(1, 4, n, d) for n in (1024, 4096, 16384) for d in (40, 64, 128, 160)]
    assert op.default_shapes("cpu", 3, 5, quick=True) == [(3, 5, 1024, 64)]
    given = [(2, 4, 100, 32), (1, 1, 50, 8)]
    assert op.default_shapes("cpu", given=given) == given
    assert op.default_shapes("cpu", scaling=True) == [(1, 2, 2**k, 64) for k in range(8, 15)]
    # the scaling study keeps the first given shape's (b, h, d) and varies N
    assert op.default_shapes("cpu", scaling=True, quick=True, given=given) == [(2, 4, 2**k, 32) for k in range(8, 12)]


def test_default_dtypes():
    assert op.default_dtypes("cpu") == ("f32", "bf16") and op.default_dtypes("cpu", scaling=True) == ("f32",)
    assert op.default_dtypes("cuda") == ("f16", "bf16") == op.default_dtypes("cuda", scaling=True)


def test_cost_lines():
    case = {"dtype": "f32", "n": 1024, "d": 64}
    rows = [dict(case, implementation=name, ms=ms) for name, ms in
            (("fused", 2.0), ("fused+all stats", 3.0), ("fused+entropy", 4.0), ("materialising", 30.0))]
    rows.append(dict(case, n=4096, implementation="fused", ms=1.0))  # alone in its case: no line
    rows.append(dict(case, n=4096, implementation="materialising", skipped="over budget"))
    assert op.cost_lines(rows) == [
        "f32     1024   64 fused+entropy is 7.5x faster than the materialising path",
        "f32     1024   64 all statistics cost 1.50x the plain fused kernel",
    ]


def test_gemm_peak_and_each_rows_share_of_it():
    peaks = op.gemm_peak(["f32", "bf16"], repeats=1, n=64)
    assert set(peaks) == {"f32", "bf16"} and all(g > 0 for g in peaks.values())
    rows = [{"dtype": "f32", "n": 8, "d": 4, "implementation": "fused", "gflops": 50.0},
            {"dtype": "bf16", "n": 8, "d": 4, "implementation": "sdpa", "gflops": 30.0},
            {"dtype": "f32", "n": 8, "d": 4, "implementation": "materialising", "skipped": "over budget"}]
    lines = op.peak_lines(rows, {"f32": 200.0, "bf16": 120.0}, n=64)
    assert rows[0]["gemm_peak_pct"] == 25.0 and rows[1]["gemm_peak_pct"] == 25.0
    assert "gemm_peak_pct" not in rows[2]
    assert lines[0].startswith("f32   GEMM peak (torch.mm 64^3") and "200 GFLOP/s" in lines[0]
    assert sum("of the GEMM peak" in line for line in lines) == 2


def test_gemm_peak_keeps_the_higher_of_two_measurements():
    assert op.gemm_peak(["f32"], repeats=1, n=64, best_of={"f32": 1e9})["f32"] == 1e9
    assert op.gemm_peak(["f32"], repeats=1, n=64, best_of={"f32": 1e-9})["f32"] > 1e-9
    assert op.gemm_peak(["f32"], repeats=1, n=64, best_of={"bf16": 1e9})["f32"] < 1e9
