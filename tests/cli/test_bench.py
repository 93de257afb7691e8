"""``diffcirc bench`` (op, unet, sweep, joint, compare) and the thin scripts of ``benchmarks/``: the JSON/CSV
schema, --compare, plots, refusals of wrong implementations, options reaching the library, option
ranges. The sweep runs on the tiny UNet with 2 conditions x 1 image. No wall-clock limits."""

import ast
import csv
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from diffcirc.bench import configs, implementations, op
from diffcirc.cli import main as cli_main
from diffcirc.cli.bench import EXIT_REFUSED, EXIT_REGRESSION, compare_files

pytest.importorskip("diffusers")

from diffcirc.bench import joint, sweep, unet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ["bench", "sweep", "--quick", "--conditions", "2", "--threads", "1"]


def _wrong(c):
    out, _ = implementations.sdpa(c)
    return out + 0.5, None


def _run_op(tmp_path, name, *extra):
    out = tmp_path / name
    rc = cli_main(["bench", "op", "--dtype", "f32", "--shapes", "1x1x32x16", "1x1x64x16", "--repeats", "2",
                   "--threads", "1", "--out", str(out), *extra])
    return rc, out


# ---------------------------------------------------------------------------------------------
# bench op

def test_cli_refuses_wrong_implementation(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "sdpa", _wrong)
    rc, out = _run_op(tmp_path, "refused", "--impl", "sdpa", "--no-plots")
    assert rc == EXIT_REFUSED
    assert "refused" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_json_csv_schema_and_compare(tmp_path, capsys):
    rc, out = _run_op(tmp_path, "run", "--impl", "fused", "sdpa", "materialising", "--no-plots")
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    for key in ("machine", "cpu", "isa", "torch", "cuda", "gpu", "commit", "device", "threads"):
        assert key in data["meta"]
    assert data["meta"]["kind"] == "op" and data["meta"]["optional_baselines"]["xformers"] == "cuda only"
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
    assert "fused+entropy" not in capsys.readouterr().out  # cost lines only for the implementations run

    new = str(out / "results.json")
    assert compare_files(new, new, 10.0) == 0  # an unchanged run passes
    planted = dict(data, results=[dict(r) for r in data["results"]])
    planted["results"][0]["ms"] /= 1.5  # the old run was faster on one case: +50% now
    old = tmp_path / "old.json"
    old.write_text(json.dumps(planted))
    assert compare_files(new, str(old), 10.0) == EXIT_REGRESSION
    assert "REGRESSION" in capsys.readouterr().out
    assert compare_files(new, str(old), 60.0) == 0  # under a looser threshold it passes


def test_cli_compare_exits_nonzero_on_planted_regression(tmp_path):
    old = tmp_path / "old.json"
    rows = [{"dtype": "f32", "b": 1, "h": 1, "n": n, "d": 16, "implementation": "sdpa", "ms": 1e-9} for n in (32, 64)]
    old.write_text(json.dumps({"meta": {}, "results": rows}))
    rc, _ = _run_op(tmp_path, "cmp", "--impl", "sdpa", "--no-plots", "--compare", str(old))
    assert rc == EXIT_REGRESSION


def test_compare_command_with_no_case_in_common(tmp_path, capsys):
    for name, n in (("a.json", 32), ("b.json", 64)):
        row = {"dtype": "f32", "n": n, "implementation": "sdpa", "ms": 1.0}
        (tmp_path / name).write_text(json.dumps({"meta": {}, "results": [row]}))
    assert cli_main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "no case in common" in capsys.readouterr().err


def test_plots_written_on_tiny_quick_run(tmp_path):
    rc, out = _run_op(tmp_path, "plots", "--quick", "--impl", "fused", "sdpa", "materialising")
    assert rc == 0
    for name in ("time_vs_n.png", "gflops_vs_n.png", "memory_vs_n.png", "speedup_vs_sdpa.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, name


def test_op_options_reach_the_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(op, "run_op", lambda *a, **k: calls.append((a, k)) or [])
    assert cli_main(["bench", "op", "--shapes", "4x3x100x8", "50x16", "--b", "2", "--h", "5", "--dtype", "bf16",
                     "--impl", "fused", "materialising", "--repeats", "7", "--mem-budget-gib", "0.5",
                     "--no-plots", "--out", str(tmp_path)]) == 0
    (args, _), = calls
    shapes, dtypes, impls, device, repeats, budget, unavailable = args
    assert shapes == [(4, 3, 100, 8), (2, 5, 50, 16)] and list(dtypes) == ["bf16"]
    assert list(impls) == ["fused", "materialising"] and device == "cpu" and repeats == 7
    assert budget == 0.5 * 2**30 and unavailable == {}
    calls.clear()
    assert cli_main(["bench", "op", "--scaling", "--quick", "--no-plots", "--out", str(tmp_path)]) == 0
    (args, _), = calls
    assert args[0] == op.default_shapes("cpu", scaling=True, quick=True) and list(args[1]) == ["f32"]
    assert args[4] == op.QUICK_REPEATS


def test_op_refuses_an_implementation_the_device_lacks(tmp_path, capsys):
    assert cli_main(["bench", "op", "--impl", "sdpa-flash", "--out", str(tmp_path / "out")]) == 2
    assert "sdpa-flash not available on cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# bench unet and bench sweep: options

def test_unet_options_reach_the_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(unet, "run_unet", lambda cfg, device, **k: seen.append((cfg, device)) or [])
    assert cli_main(["bench", "unet", "--quick", "--latent", "8", "--widths", "320", "--sd-batch", "3",
                     "--impl", "fused", "--warmup", "0", "--tolerance", "0.01", "--no-plots",
                     "--out", str(tmp_path)]) == 0
    (cfg, device), = seen
    assert cfg == configs.UnetConfig(latent=8, widths=(320,), sd_batch=3, unet_batch=2, impl=("sdpa", "fused"),
                                     warmup=0, repeats=2, tolerance=0.01) and device == "cpu"
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["kind"] == "unet" and meta["config"]["latent"] == 8


def test_sweep_options_reach_the_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, device, **k: seen.append((cfg, k)) or [])
    assert cli_main(["bench", "sweep", "--images", "2", "--repeats", "4", "--warmup", "2", "--conditions", "3", "5",
                     "--max-batch", "4", "--model", "sd15", "bundled", "--heads-per-layer", "1", "--no-plots",
                     "--out", str(tmp_path)]) == 0
    assert seen == [(configs.SweepConfig(images=2, conditions=(3, 5), max_batch=(4,), warmup=2, repeats=4),
                     {"models": ("sd15", "bundled"), "heads_per_layer": 1})]


@pytest.mark.parametrize("command, config", [("unet", configs.UnetConfig), ("sweep", configs.SweepConfig)])
def test_every_config_field_is_an_option_of_the_same_name(capsys, command, config):
    """One name per setting: a field of the config is the option --field-name of its command, and the
    options the two commands share (--repeats, --warmup, --tolerance, ...) are spelt the same."""
    with pytest.raises(SystemExit):
        cli_main(["bench", command, "--help"])
    flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    for field in dataclasses.fields(config):
        assert "--" + field.name.replace("_", "-") in flags, field.name


# ---------------------------------------------------------------------------------------------
# bench sweep: runs

@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One sweep run (2 conditions x 1 image; one at a time, batched by 1 and by 2) with plots."""
    out = tmp_path_factory.mktemp("sweep")
    rc = cli_main([*SWEEP, "--max-batch", "1", "2", "--out", str(out)])
    return rc, out


def test_sweep_writes_json_csv_and_plots(sweep_run):
    rc, out = sweep_run
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["kind"] == "sweep"
    for key in ("machine", "cpu", "isa", "torch", "cuda", "gpu", "commit", "device", "threads"):
        assert key in data["meta"], key
    rows = data["results"]
    assert [(r["implementation"], r["max_batch"], r["passes"]) for r in rows] == [
        ("one at a time", None, 2), ("batched", 1, 2), ("batched", 2, 1), ("batched + reuse", 1, 3),
        ("batched + reuse", 2, 3)]  # with reuse: the clean pass first, then each condition from its stage
    for r in rows:
        assert r["conditions"] == 2 and r["images"] == 1
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["max_abs_err"] <= 1e-3 and r["peak_extra_bytes"] >= 0
        assert r["images_per_s"] == pytest.approx(2 / (r["ms"] / 1e3))
        assert r["speedup_vs_one_at_a_time"] == pytest.approx(rows[0]["ms"] / r["ms"])
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["max_batch"] for line in lines] == ["", "1", "2", "1", "2"]
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
    real = sweep.run_conditions
    monkeypatch.setattr(sweep, "run_conditions", lambda *a, **k: real(*a, **k) + 0.5)
    rc = cli_main([*SWEEP, "--max-batch", "2", "--out", str(tmp_path)])
    assert rc == EXIT_REFUSED
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("extra", [["--max-batch", "1", "--images", "2"], ["--conditions", "2", "999"]])
def test_sweep_rejects_impossible_options_before_measuring(tmp_path, capsys, extra):
    rc = cli_main([*SWEEP, *extra, "--out", str(tmp_path)])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# option ranges: a count out of range is a usage error before anything runs

class _Started(Exception):
    """The benchmark started despite a bad option."""


@pytest.fixture
def nothing_starts(monkeypatch):
    """Every benchmark raises _Started if it is reached."""
    def started(*args, **kwargs):
        raise _Started

    for module, name in ((op, "run_op"), (unet, "run_unet"), (sweep, "run_sweep"), (joint, "run_joint")):
        monkeypatch.setattr(module, name, started)


@pytest.mark.parametrize("argv, option", [
    (["sweep", "--images", "0"], "--images"),
    (["sweep", "--images", "-1"], "--images"),
    (["sweep", "--repeats", "0"], "--repeats"),
    (["sweep", "--max-batch", "4", "0"], "--max-batch"),
    (["sweep", "--conditions", "0"], "--conditions"),
    (["sweep", "--tolerance", "-1"], "--tolerance"),
    (["unet", "--repeats", "-2"], "--repeats"),
    (["unet", "--latent", "0"], "--latent"),
    (["unet", "--impl", "flash"], "--impl"),
    (["op", "--threads", "0"], "--threads"),
    (["op", "--repeats", "0"], "--repeats"),
    (["op", "--b", "0"], "--b"),
    (["op", "--shapes", "2x8x0x64"], "--shapes"),
    (["op", "--shapes", "64xq"], "--shapes"),
    (["op", "--mem-budget-gib", "-1"], "--mem-budget-gib"),
    (["op", "--threshold", "nan"], "--threshold"),
    (["op", "--dtype", "f64"], "--dtype"),
    (["joint", "--heads", "0"], "--heads"),
    (["joint", "--n-txt", "0"], "--n-txt"),
    (["joint", "--impl", "flash"], "--impl"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_count_out_of_range_is_a_usage_error(tmp_path, capsys, nothing_starts, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# benchmarks/: thin entry points over the same commands

def _script(name: str):
    """benchmarks/<name>.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv", [
    ("bench_sweep", ["--repeats", "0"]), ("bench_sweep", ["--images", "-1"]),
    ("bench_unet", ["--repeats", "0"]), ("bench_unet", ["--threads", "0"]), ("bench_unet", ["--latent", "0"]),
    ("bench_unet", ["--warmup", "-1"]), ("bench_sweep", ["--max-batch", "0"]),
    ("bench_attention", ["--repeats", "0"]), ("bench_attention", ["--threads", "0"]),
    ("bench_attention", ["--shapes", "0"]), ("bench_attention", ["--b", "-1"]),
    ("bench_joint", ["--heads", "0"]), ("bench_joint", ["--repeats", "0"]),
])
def test_bench_scripts_check_their_counts(nothing_starts, script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script(script).main(argv)
    assert exit_info.value.code == 2 and f"argument {argv[0]}:" in capsys.readouterr().err


@pytest.mark.parametrize("script, command, runner", [
    ("bench_attention", "op", (op, "run_op")), ("bench_unet", "unet", (unet, "run_unet")),
    ("bench_sweep", "sweep", (sweep, "run_sweep")), ("bench_joint", "joint", (joint, "run_joint")),
])
def test_bench_scripts_run_the_command(tmp_path, monkeypatch, script, command, runner):
    ran = []
    monkeypatch.setattr(*runner, lambda *a, **k: ran.append(command) or [])
    assert _script(script).main(["--no-plots", "--out", str(tmp_path)]) == 0
    assert ran == [command] and (tmp_path / "results.json").exists()


def _imported_modules(path: Path) -> list:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("folder", ["benchmarks", "diffcirc/bench"])
def test_benchmarks_import_nothing_private_and_load_no_file_by_path(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in _imported_modules(path):
            private = [part for part in name.split(".") if part.startswith("_") and part != "__future__"]
            assert not private, f"{path.name} imports {name}"
        assert "spec_from_file_location" not in path.read_text(), path.name
