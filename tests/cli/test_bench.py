"""``diffcirc bench sweep``, the UNet plots and the optional GPU baselines (xformers, flash-attn).

The sweep runs on the tiny UNet with 2 conditions x 1 image; the optional baselines are fake
modules put into sys.modules (the real libraries are GPU-only and not installed here), computing
attention with torch so the discovery and the correctness gate can be exercised on the CPU.
No wall-clock limits."""

import csv
import json
import sys
import types

import pytest
import torch

from diffcirc.bench import harness, op
from diffcirc.bench.plots import write_unet_plots
from diffcirc.bench.unet import load_bench_unet
from diffcirc.cli import main as cli_main
from diffcirc.cli.bench import EXIT_REFUSED, EXIT_REGRESSION, compare_files

pytest.importorskip("diffusers")

SWEEP = ["bench", "sweep", "--quick", "--conditions", "2", "--threads", "1"]
SHAPE = (1, 2, 32, 16)  # H != N so that a kernel reading the wrong layout gives a wrong answer


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One sweep run (2 conditions x 1 image; one at a time, batched by 1 and by 2) with plots."""
    out = tmp_path_factory.mktemp("sweep")
    rc = cli_main([*SWEEP, "--max-batch", "1", "2", "--out", str(out)])
    return rc, out


# ---------------------------------------------------------------------------------------------
# bench sweep

def test_sweep_writes_json_csv_and_plots(sweep_run):
    rc, out = sweep_run
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["kind"] == "sweep"
    for key in ("machine", "cpu", "isa", "torch", "cuda", "gpu", "commit", "device", "threads"):
        assert key in data["meta"], key
    rows = data["results"]
    assert [(r["implementation"], r["max_batch"], r["passes"]) for r in rows] == [
        ("one at a time", None, 2), ("batched", 1, 2), ("batched", 2, 1)]
    for r in rows:
        assert r["conditions"] == 2 and r["images"] == 1
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["max_abs_err"] <= 1e-3 and r["peak_extra_bytes"] >= 0
        assert r["images_per_s"] == pytest.approx(2 / (r["ms"] / 1e3))
        assert r["speedup_vs_one_at_a_time"] == pytest.approx(rows[0]["ms"] / r["ms"])
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["max_batch"] for line in lines] == ["", "1", "2"]
    assert float(lines[2]["ms"]) == pytest.approx(rows[2]["ms"])
    for name in ("sweep_throughput.png", "sweep_speedup.png"):
        assert (out / name).stat().st_size > 1000, name


def test_sweep_compare_tells_batch_sizes_apart(sweep_run, tmp_path, capsys):
    _, out = sweep_run
    new = str(out / "results.json")
    assert compare_files(new, new, 10.0) == 0
    data = json.loads((out / "results.json").read_text())
    data["results"][2]["ms"] /= 1.5  # only batched with max_batch 2 was faster before: +50% now
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    capsys.readouterr()
    assert compare_files(new, str(old), 10.0) == EXIT_REGRESSION
    flagged = [line for line in capsys.readouterr().out.splitlines() if "REGRESSION" in line]
    assert len(flagged) == 1 and "max_batch=2" in flagged[0]


def test_sweep_cli_compare_exits_nonzero_on_planted_regression(sweep_run, tmp_path):
    _, out = sweep_run
    data = json.loads((out / "results.json").read_text())
    for r in data["results"]:
        r["ms"] = 1e-6  # an old run that was impossibly fast
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    rc = cli_main([*SWEEP, "--max-batch", "2", "--no-plots", "--out", str(tmp_path / "new"), "--compare", str(old)])
    assert rc == EXIT_REGRESSION
    assert not list((tmp_path / "new").glob("*.png"))  # --no-plots


def test_sweep_refuses_a_wrong_batched_run(tmp_path, monkeypatch, capsys):
    mod = load_bench_unet()
    real = mod.run_conditions
    monkeypatch.setattr(mod, "run_conditions", lambda *a, **k: real(*a, **k) + 0.5)
    rc = cli_main([*SWEEP, "--max-batch", "2", "--out", str(tmp_path)])
    assert rc == EXIT_REFUSED
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_unet_refuses_a_wrong_implementation_listed_before_sdpa(monkeypatch):
    """--impl fused sdpa: sdpa still runs first, so fused is checked against it and, wrong, refused
    before it is timed; listed first without a reference (nan error), it is refused too."""
    mod = load_bench_unet()
    args = mod.finish_args(mod.build_parser().parse_args(["--impl", "fused", "sdpa", "--quick", "--threads", "1"]))
    assert args.impl == ["sdpa", "fused"]

    class WrongFused(mod.FusedAttnProcessor):
        def __call__(self, *a, **k):
            return super().__call__(*a, **k) + 0.5

    monkeypatch.setattr(mod, "FusedAttnProcessor", WrongFused)
    timed = []
    real_measure = mod.measure
    monkeypatch.setattr(mod, "measure", lambda fn, *a: timed.append(fn) or real_measure(fn, *a))
    device = torch.device("cpu")
    model, forward, batch = mod.tiny_unet(1, device)
    labels = mod.label_map(batch, 32, device)
    with pytest.raises(AssertionError, match="fused: output differs"):
        mod.bench_case("tiny-unet", model, forward, labels, args, device)
    assert len(timed) == 1  # sdpa only: fused was refused before timing

    args.impl = ["fused", "sdpa"]  # not through finish_args: no reference yet when fused runs
    timed.clear()
    with pytest.raises(AssertionError, match="fused: output differs .* nan"):
        mod.bench_case("tiny-unet", model, forward, labels, args, device)
    assert timed == []


@pytest.mark.parametrize("extra", [["--max-batch", "1", "--images", "2"], ["--conditions", "2", "999"]])
def test_sweep_rejects_impossible_options_before_measuring(tmp_path, capsys, extra):
    rc = cli_main([*SWEEP, *extra, "--out", str(tmp_path)])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# bench unet plots

def test_unet_plots_from_rows(tmp_path):
    rows = [{"case": f"{case} 16x16", "implementation": impl, "ms": ms, "ms_min": ms * 0.9, "ms_max": ms * 1.2,
             "vs_sdpa": ms / 10.0, "peak_extra_bytes": int(ms) * 2**20}
            for case in ("sd-block w320", "tiny-unet b2") for impl, ms in (("sdpa", 10.0), ("fused", 8.0))]
    paths = write_unet_plots(rows, str(tmp_path), title="test")
    assert [p.split("/")[-1] for p in paths] == ["unet_time.png", "unet_speedup_vs_sdpa.png", "unet_memory.png"]
    for p in paths:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# optional baselines

def _attention_bnhd(q, k, v):
    """softmax(q k^T / sqrt(D)) v on (B, N, H, D) tensors, the layout xformers and flash-attn take."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (p @ v).transpose(1, 2)


def _as_if_bhnd(q, k, v):
    """A kernel that wrongly takes its (B, N, H, D) inputs for (B, H, N, D): attends over heads."""
    return _attention_bnhd(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _install(monkeypatch, name: str, kernel, version="0.0+fake"):
    """Puts a fake package providing the optional baseline `name` with kernel into sys.modules."""
    module, attr = harness.OPTIONAL_BASELINES[name]
    top = module.split(".")[0]
    package = types.ModuleType(top)
    package.__version__ = version
    monkeypatch.setitem(sys.modules, top, package)
    target = package
    if module != top:
        target = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, target)
    setattr(target, attr, kernel)


@pytest.fixture
def absent(monkeypatch):
    """Neither library importable, whatever is installed (None in sys.modules stops an import)."""
    for module in ("xformers", "xformers.ops", "flash_attn"):
        monkeypatch.setitem(sys.modules, module, None)


def _counting(kernel):
    def run(q, k, v):
        run.shapes.append(tuple(q.shape))
        return kernel(q, k, v)
    run.shapes = []
    return run


def test_absent_baselines_are_listed_not_an_error(absent):
    found, status = harness.optional_baselines("cuda")
    assert found == {} and status == {"xformers": "not installed", "flash-attn": "not installed"}
    known, missing, _ = harness.op_implementations("cuda")
    assert "xformers" not in known and missing["flash-attn"] == "not installed"
    rows = op.run_op([SHAPE], ["f32"], {"sdpa": harness.sdpa}, unavailable=missing, log=lambda *a: None)
    listed = {r["implementation"]: r for r in rows}
    assert listed["xformers"]["skipped"] == "not installed" and "ms" not in listed["xformers"]
    assert "ms" in listed["sdpa"]


@pytest.mark.parametrize("name", list(harness.OPTIONAL_BASELINES))
def test_fake_baseline_is_discovered_and_checked(absent, monkeypatch, name):
    kernel = _counting(_attention_bnhd)
    _install(monkeypatch, name, kernel)
    assert harness.optional_baselines("cpu") == ({}, {n: "cuda only" for n in harness.OPTIONAL_BASELINES})
    found, status = harness.optional_baselines("cuda")
    assert list(found) == [name] and status[name] == "available (0.0+fake)"
    known, missing, _ = harness.op_implementations("cuda")
    assert name in known and name not in missing and len(missing) == 1
    rows = op.run_op([SHAPE], ["f32"], {"sdpa": harness.sdpa, name: found[name]}, repeats=1, log=lambda *a: None)
    (row,) = [r for r in rows if r["implementation"] == name]
    assert row["max_abs_err"] < 1e-5 and row["vs_sdpa"] is not None
    b, h, n, d = SHAPE
    assert set(kernel.shapes) == {(b, n, h, d)}  # handed (B, N, H, D), as the library expects


@pytest.mark.parametrize("wrong", [_as_if_bhnd, lambda q, k, v: _attention_bnhd(q, k, v) + 0.5],
                         ids=["wrong-layout", "wrong-values"])
@pytest.mark.parametrize("name", list(harness.OPTIONAL_BASELINES))
def test_wrong_fake_baseline_is_refused_before_timing(absent, monkeypatch, name, wrong):
    kernel = _counting(wrong)
    _install(monkeypatch, name, kernel)
    found, _ = harness.optional_baselines("cuda")
    with pytest.raises(harness.IncorrectImplementation, match=name):
        op.run_op([SHAPE], ["f32"], {"sdpa": harness.sdpa, name: found[name]}, repeats=3, log=lambda *a: None)
    assert len(kernel.shapes) == 1  # the check only: no warm-up, no timed calls


def test_broken_install_says_why(absent, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # without flash_attn_func
    _, status = harness.optional_baselines("cuda")
    assert status["flash-attn"] == "import failed: flash_attn has no flash_attn_func"


def test_baseline_that_cannot_run_a_case_is_skipped_but_fused_is_not():
    def unsupported(c):
        raise RuntimeError("FlashAttention only supports fp16 and bf16 data type\nmore")

    rows = op.run_op([SHAPE], ["f32"], {"sdpa": harness.sdpa, "flash-attn": unsupported}, repeats=1,
                     log=lambda *a: None)
    skipped = {r["implementation"]: r.get("skipped") for r in rows}
    assert skipped == {"sdpa": None, "flash-attn": "failed: FlashAttention only supports fp16 and bf16 data type"}
    with pytest.raises(RuntimeError):
        op.run_op([SHAPE], ["f32"], {"fused": unsupported}, repeats=1, log=lambda *a: None)


def _fails_on_n(n, error):
    """A (B, N, H, D) kernel that raises error for sequence length n and is right otherwise."""
    def kernel(q, k, v):
        if q.shape[1] == n:
            raise error
        return _attention_bnhd(q, k, v)
    return kernel


@pytest.mark.parametrize("name", list(harness.OPTIONAL_BASELINES))
def test_optional_baseline_failing_with_any_error_is_skipped_and_the_run_goes_on(absent, monkeypatch, name):
    _install(monkeypatch, name, _fails_on_n(32, TypeError("unsupported head dim 16\nmore")))
    found, _ = harness.optional_baselines("cuda")
    other = (1, 2, 48, 16)
    rows = op.run_op([SHAPE, other], ["f32"], {"sdpa": harness.sdpa, name: found[name]}, repeats=1,
                     log=lambda *a: None)
    by_case = {(r["n"], r["implementation"]): r for r in rows}
    assert by_case[(32, name)]["skipped"] == "failed: unsupported head dim 16" and "ms" not in by_case[(32, name)]
    assert "ms" in by_case[(48, name)] and "ms" in by_case[(32, "sdpa")]


def test_only_optional_baselines_are_skipped_on_any_error():
    def broken(c):
        raise TypeError("a bug")

    for name in ("sdpa", "fused"):  # a TypeError of torch's own or of diffcirc's is a bug, not an unsupported case
        with pytest.raises(TypeError):
            op.run_op([SHAPE], ["f32"], {name: broken}, repeats=1, log=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# benchmarks/bench_attention.py --device cuda (op.run_op with device="cuda"), run on the CPU: the
# GPU timer and memory helpers replaced, in harness where run_op looks them up, by the CPU ones

def _bench_attention():
    """benchmarks/bench_attention.py as a fresh module."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_cuda(monkeypatch, tmp_path):
    """bench_attention.run(args with device="cuda", impls) -> its JSON rows, on the CPU: op.run_op
    with device="cuda", its cases made on the CPU, CPU timing, no memory figures."""
    import argparse

    mod = _bench_attention()
    real_make_case = harness.make_case
    monkeypatch.setattr(harness, "make_case", lambda *a, device=None, **k: real_make_case(*a, **k))
    monkeypatch.setattr(harness, "cuda_time_call", harness.time_call)
    monkeypatch.setattr(harness, "cuda_peak_extra_memory", lambda fn, case: 0)
    monkeypatch.setattr(harness, "cuda_machine_info", lambda: {})
    calls = []
    real_run_op = op.run_op
    monkeypatch.setattr(mod, "run_op", lambda *a, **k: calls.append(k.get("device")) or real_run_op(*a, **k))

    def run(impls):
        b, h, _, d = SHAPE
        out = tmp_path / "results.json"
        args = argparse.Namespace(device="cuda", dtype=["f32"], n=[32, 48], d=[d], b=b, h=h, impl=list(impls),
                                  repeats=1, json=str(out))
        assert mod.run(args, impls) == 0
        assert calls == ["cuda"]  # one run_op, on the (simulated) GPU
        return json.loads(out.read_text())["results"]
    return run


@pytest.mark.parametrize("name", list(harness.OPTIONAL_BASELINES))
def test_bench_attention_refuses_a_wrong_optional_baseline(absent, monkeypatch, run_cuda, name):
    _install(monkeypatch, name, lambda q, k, v: _attention_bnhd(q, k, v) + 0.5)
    found, _ = harness.optional_baselines("cuda")
    with pytest.raises(harness.IncorrectImplementation, match=name):
        run_cuda({"sdpa": harness.sdpa, name: found[name]})


@pytest.mark.parametrize("name", list(harness.OPTIONAL_BASELINES))
def test_bench_attention_skips_an_optional_baseline_that_fails(absent, monkeypatch, run_cuda, name):
    _install(monkeypatch, name, _fails_on_n(32, TypeError("unsupported head dim 16")))
    found, _ = harness.optional_baselines("cuda")
    rows = run_cuda({"sdpa": harness.sdpa, name: found[name]})
    by_case = {(r["n"], r["implementation"]): r for r in rows}
    assert by_case[(32, name)]["skipped"] == "failed: unsupported head dim 16" and "ms" not in by_case[(32, name)]
    assert "ms" in by_case[(48, name)]


# ---------------------------------------------------------------------------------------------
# option ranges: a count out of range is a usage error before anything runs

class _Started(Exception):
    """The benchmark started despite a bad option."""


@pytest.mark.parametrize("argv, option", [
    (["sweep", "--images", "0"], "--images"),
    (["sweep", "--images", "-1"], "--images"),
    (["sweep", "--repeats", "0"], "--repeats"),
    (["sweep", "--max-batch", "4", "0"], "--max-batch"),
    (["sweep", "--conditions", "0"], "--conditions"),
    (["unet", "--repeats", "-2"], "--repeats"),
    (["op", "--threads", "0"], "--threads"),
    (["op", "--repeats", "0"], "--repeats"),
    (["op", "--b", "0"], "--b"),
    (["op", "--shapes", "2x8x0x64"], "--shapes"),
    (["op", "--shapes", "64xq"], "--shapes"),
    (["op", "--mem-budget-gib", "-1"], "--mem-budget-gib"),
    (["op", "--threshold", "nan"], "--threshold"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_count_out_of_range_is_a_usage_error(tmp_path, monkeypatch, capsys, argv, option):
    import diffcirc.bench.unet as bench_unet

    def started(*args, **kwargs):
        raise _Started

    for module, name in ((op, "run_op"), (bench_unet, "run_unet"), (bench_unet, "run_sweep")):
        monkeypatch.setattr(module, name, started)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, argv", [
    ("bench_unet", ["--sweep-repeats", "0"]), ("bench_unet", ["--sweep-images", "-1"]),
    ("bench_unet", ["--repeats", "0"]), ("bench_unet", ["--threads", "0"]), ("bench_unet", ["--latent", "0"]),
    ("bench_unet", ["--warmup", "-1"]), ("bench_unet", ["--max-batch", "0"]),
    ("bench_attention", ["--repeats", "0"]), ("bench_attention", ["--threads", "0"]),
    ("bench_attention", ["--n", "0"]), ("bench_attention", ["--b", "-1"]),
])
def test_bench_scripts_check_their_counts(monkeypatch, script, argv, capsys):
    if script == "bench_unet":
        parse = load_bench_unet().build_parser().parse_args
    else:
        module = _bench_attention()
        monkeypatch.setattr(module, "run_op", lambda *a, **k: (_ for _ in ()).throw(_Started()))
        parse = module.main
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2 and f"argument {argv[0]}:" in capsys.readouterr().err
