"""The benchmark harness and ``diffcirc bench``: ordering of timings, the correctness gate,
--compare, the JSON/CSV schema, plots and the scaling fit. Tiny shapes only; no wall-clock limits."""

import csv
import json
import math
import time

import pytest

from diffcirc.bench import harness, op
from diffcirc.cli import main as cli_main
from diffcirc.cli.bench import EXIT_REFUSED, EXIT_REGRESSION, compare_files, parse_shape

SHAPE = (1, 1, 32, 16)


def _counting(fn):
    def run(c):
        run.calls += 1
        return fn(c)
    run.calls = 0
    return run


def _slow(c):
    time.sleep(0.1)
    return harness.sdpa(c)


def _wrong(c):
    out, _ = harness.sdpa(c)
    return out + 0.5, None


def _run_cli(tmp_path, name, *extra):
    out = tmp_path / name
    rc = cli_main(["bench", "op", "--dtype", "f32", "--shapes", "1x1x32x16", "1x1x64x16", "--repeats", "2",
                   "--out", str(out), *extra])
    return rc, out


def test_slow_implementation_is_reported_slower():
    rows = op.run_op([SHAPE], ["f32"], {"fast": harness.sdpa, "slow": _slow}, repeats=3, log=lambda *a: None)
    # the fastest of the repeats: the machine may be shared, and a stall only ever adds time
    fastest = {r["implementation"]: r["ms_min"] for r in rows}
    assert fastest["slow"] > fastest["fast"]
    assert fastest["slow"] >= 100.0  # the sleep is inside every timed call


def test_wrong_implementation_is_refused_before_timing():
    wrong = _counting(_wrong)
    with pytest.raises(harness.IncorrectImplementation, match="wrong"):
        op.run_op([SHAPE], ["f32"], {"sdpa": harness.sdpa, "wrong": wrong}, repeats=3, log=lambda *a: None)
    assert wrong.calls == 1  # the check only: no warm-up, no timed calls


def test_cli_refuses_wrong_implementation(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(harness.IMPLEMENTATIONS, "sdpa", _wrong)
    rc, out = _run_cli(tmp_path, "refused", "--impl", "sdpa", "--no-plots")
    assert rc == EXIT_REFUSED
    assert "refused" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_materialising_skipped_over_memory_budget():
    mat = _counting(harness.materialising)
    rows = op.run_op([SHAPE], ["f32"], {"materialising": mat}, mem_budget=1024, log=lambda *a: None)
    assert mat.calls == 0 and "budget" in rows[0]["skipped"] and "ms" not in rows[0]


def test_json_csv_schema_and_compare(tmp_path, capsys):
    rc, out = _run_cli(tmp_path, "run", "--impl", "fused", "sdpa", "materialising", "--no-plots")
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    for key in ("machine", "cpu", "isa", "torch", "cuda", "gpu", "commit", "device", "threads"):
        assert key in data["meta"]
    assert len(data["results"]) == 2 * 3
    for r in data["results"]:
        for key in ("implementation", "dtype", "b", "h", "n", "d", "ms", "ms_min", "ms_max", "gflops", "vs_sdpa",
                    "peak_extra_bytes", "max_abs_err"):
            assert key in r, key
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(data["results"])
    assert {r["implementation"] for r in lines} == {"fused", "sdpa", "materialising"}
    assert float(lines[0]["ms"]) == pytest.approx(data["results"][0]["ms"])

    new = str(out / "results.json")
    assert compare_files(new, new, 10.0) == 0  # an unchanged run passes
    planted = dict(data, results=[dict(r) for r in data["results"]])
    planted["results"][0]["ms"] /= 1.5  # the old run was faster on one case: +50% now
    old = tmp_path / "old.json"
    old.write_text(json.dumps(planted))
    assert compare_files(new, str(old), 10.0) == EXIT_REGRESSION
    assert "REGRESSION" in capsys.readouterr().out
    assert compare_files(new, str(old), 60.0) == 0  # under a looser threshold it passes


def test_compare_flags_only_the_regressed_case():
    old = [{"n": 1, "implementation": "a", "ms": 10.0}, {"n": 1, "implementation": "b", "ms": 10.0}]
    new = [{"n": 1, "implementation": "a", "ms": 10.5}, {"n": 1, "implementation": "b", "ms": 12.0}]
    res = {c["key"]["implementation"]: c for c in harness.compare(old, new, 10.0)}
    assert not res["a"]["regressed"] and res["b"]["regressed"]
    assert res["b"]["change_pct"] == pytest.approx(20.0)


def test_cli_compare_exits_nonzero_on_planted_regression(tmp_path):
    old = tmp_path / "old.json"
    rows = [{"dtype": "f32", "b": 1, "h": 1, "n": n, "d": 16, "implementation": "sdpa", "ms": 1e-9} for n in (32, 64)]
    old.write_text(json.dumps({"meta": {}, "results": rows}))
    rc, _ = _run_cli(tmp_path, "cmp", "--impl", "sdpa", "--no-plots", "--compare", str(old))
    assert rc == EXIT_REGRESSION


def test_plots_written_on_tiny_quick_run(tmp_path):
    rc, out = _run_cli(tmp_path, "plots", "--quick", "--impl", "fused", "sdpa", "materialising")
    assert rc == 0
    for name in ("time_vs_n.png", "gflops_vs_n.png", "memory_vs_n.png", "speedup_vs_sdpa.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, name


def test_scaling_fit_recovers_known_exponents():
    ns = [256, 512, 1024, 2048, 4096]
    assert harness.fit_exponent(ns, [3e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert harness.fit_exponent(ns, [7.0 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert harness.fit_exponent([1], [1.0]) is None
    rows = [{"implementation": "x", "dtype": "f32", "b": 1, "h": 1, "d": 8, "n": n, "ms": 1e-4 * n**2 * (1.01 if i % 2 else 0.99),
             "peak_extra_bytes": 40 * n} for i, n in enumerate(ns)]
    (fit,) = op.scaling_fits(rows)
    assert math.isclose(fit["time_exponent"], 2.0, abs_tol=0.02)
    assert fit["memory_exponent"] == pytest.approx(1.0)
    assert "2.00" in op.format_fits([fit])


def test_parse_shape():
    assert parse_shape("2x8x1024x64", 1, 1) == (2, 8, 1024, 64)
    assert parse_shape("4096x40", 2, 8) == (2, 8, 4096, 40)
    assert parse_shape("512", 1, 2) == (1, 2, 512, 64)
    with pytest.raises(ValueError):
        parse_shape("1x2x3", 1, 1)
