"""End to end: `diffcirc analyze` on a tiny random UNet, then `diffcirc report` from the saved tables;
rows of its tables recomputed outside the driver; one run per output folder."""

import json
import multiprocessing
import os
import shutil
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from diffcirc.analysis import metrics
from diffcirc.cli import main as cli
from helpers.analysis_models import HEADS_PER_LAYER, LAYERS, TOKENS, save_analysis_unet

TABLES = {
    "aggregates": {"model", "dataset", "timestep", "layer", "head", "stat", "count", "mean", "std", "m2"},
    "histograms": {"model", "dataset", "timestep", "layer", "head", "stat", "bin", "lo", "hi", "count"},
    "per_image": {"model", "dataset", "timestep", "image", "layer", "head", "stat", "mean"},
    "image_histograms": {"model", "dataset", "timestep", "image", "layer", "bin", "count"},
    "layers": {"layer", "kind", "heads", "head_dim", "n_keys", "grid_h", "grid_w"},
    "ablations": {"dataset", "timestep", "layer", "head", "mode", "image", "loss_clean", "loss_ablated"},
    "attribution": {"dataset", "timestep", "layer", "head", "score"},
    "role_ablations": {"dataset", "timestep", "role", "control", "rep", "image", "error_name", "err_clean", "err_ablated"},
    "circuit": {"dataset", "timestep", "step", "removed_layer", "removed_head", "kept", "degradation"},
    "circuit_resamples": {"resample", "dataset", "timestep", "step", "removed_layer", "removed_head", "kept",
                          "degradation"},
    "circuit_eval": {"dataset", "split", "timestep", "condition", "rep", "n_removed", "image", "loss_clean",
                     "loss_ablated"},
    "features_maps": {"model", "dataset", "timestep", "layer", "head", "edge_corr", "texture_corr", "n_images"},
    "controls_per_image": {"model", "dataset", "timestep", "image", "layer", "head", "stat", "mean"},
    "controls_framing": {"set", "x", "y", "width", "height", "size"},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    """One intra-op thread for the in-process runs (see ``single_thread``) and the forked ones."""


FORK = multiprocessing.get_context("fork")


def _cli_process(args, env=None, log=None, start=None):
    """A started process running ``diffcirc ARGS`` (``cli.main``): a forked copy of this one, with a
    pid of its own, killed or ended like the command, but without a new interpreter's start-up
    (importing torch, diffusers and the package: ~5 s of CPU a process). ``env`` is added to its
    environment; its stdout and stderr go to ``log`` + ".out" / ".err" (or nowhere); with ``start``
    (an Event of the fork context) it waits for it before it runs. Exit code: ``cli``'s."""
    child = FORK.Process(target=_run_cli, args=(args, env or {}, log, start))
    child.start()
    return child


def _run_cli(args, env, log, start):
    os.environ.update(env)
    torch.set_num_threads(1)  # a forked child: OpenMP's thread pool did not survive the fork
    sys.stdout = open(f"{log}.out" if log else os.devnull, "w", buffering=1)
    sys.stderr = open(f"{log}.err" if log else os.devnull, "w", buffering=1)
    if start is not None:
        start.wait()
    sys.exit(cli(args))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model_dir = save_analysis_unet(root / "tiny-unet")
    out = root / "out"
    assert cli([*analyze_args(model_dir), "--out", str(out)]) == 0
    return out


def analyze_args(model_dir):
    return ["analyze", "--model", str(model_dir), "--synthetic", "8", "--natural", "lfw", "--natural-n", "8",
            "--timesteps", "100,600", "--ablation-timesteps", "600", "--ablation-images", "8",
            "--role-control-reps", "2"]


def analyze_tables(args) -> None:
    """What ``diffcirc analyze ARGS`` computes, without the summary and report it writes after:
    the driver on the configuration that command line parses to. For the tests that check only
    the tables and the manifest of a resumed folder (test_report_rebuilds_the_same_summary tests
    the report, and test_rerun_skips_every_finished_unit reruns the whole command)."""
    from diffcirc.analysis.driver import run_analysis
    from diffcirc.cli import build_parser
    from diffcirc.cli.analyze import config_from_args

    assert run_analysis(config_from_args(build_parser().parse_args(args))) is not None


@pytest.fixture
def copy_of_run(run, tmp_path):
    """A private copy of the finished run, for tests that rerun into it."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_output_schema(run):
    for name, columns in TABLES.items():
        df = pd.read_parquet(run / f"{name}.parquet")
        assert columns <= set(df.columns), (name, columns - set(df.columns))
        assert len(df) > 0, name
    layers = pd.read_parquet(run / "layers.parquet")
    assert len(layers) == LAYERS and (layers.heads == HEADS_PER_LAYER).all() and (layers.n_keys == TOKENS).all()
    agg = pd.read_parquet(run / "aggregates.parquet")
    assert set(agg.model) == {"trained", "random"} and set(agg.dataset) == {"synthetic", "natural"}
    assert set(agg.timestep) == {100, 600}
    for name in ("summary.json", "report.html", "report.md", "meta.json"):
        assert (run / name).exists()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("complexity_ratio", "controls", "entropy_divergence", "roles", "degradation", "circuit",
                "attribution_spearman", "meta"):
        assert key in summary
    assert set(summary["controls"]["by_control"]) == {"framing", "spectrum", "seen"}
    assert {"value", "ci_low", "ci_high", "p_value"} <= set(summary["complexity_ratio"])
    assert summary["meta"]["wall_time_s"] > 0


def test_summary_equals_metric_functions_on_saved_tables(run):
    summary = json.loads((run / "summary.json").read_text())
    ratio = metrics.complexity_ratio(pd.read_parquet(run / "per_image.parquet"), n_resamples=2000, seed=0)
    assert summary["complexity_ratio"]["value"] == pytest.approx(ratio["value"], rel=1e-12)
    assert summary["complexity_ratio"]["p_value"] == pytest.approx(ratio["p_value"], rel=1e-12)
    div = metrics.entropy_divergence(pd.read_parquet(run / "histograms.parquet"), pd.read_parquet(run / "aggregates.parquet"))
    assert summary["entropy_divergence"]["min"] == pytest.approx(div["min"], rel=1e-12)
    assert summary["entropy_divergence"]["max"] == pytest.approx(div["max"], rel=1e-12)
    # entropy of a 64-token head can never exceed ln 64
    agg = pd.read_parquet(run / "aggregates.parquet")
    assert agg[agg.stat == "entropy"]["mean"].max() <= torch.log(torch.tensor(64.0)).item() + 1e-5
    # degradation is measured, not assumed: ablation losses are paired with the clean loss of the same image
    abl = pd.read_parquet(run / "ablations.parquet")
    assert abl.groupby(["dataset", "timestep", "image"])["loss_clean"].nunique().max() == 1


def test_report_rebuilds_the_same_summary(run, tmp_path):
    before = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    (run / "report.html").unlink()
    assert cli(["report", str(run)]) == 0
    after = json.loads((run / "summary.json").read_text())
    before.pop("meta"), after.pop("meta")
    assert after == before
    assert (run / "report.html").stat().st_size > 10_000


def _table_mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_rerun_skips_every_finished_unit(run, copy_of_run, capsys):
    before = _table_mtimes(copy_of_run)
    assert cli([*analyze_args(run.parent / "tiny-unet"), "--out", str(copy_of_run)]) == 0
    assert _table_mtimes(copy_of_run) == before  # nothing recomputed, nothing rewritten
    printed = capsys.readouterr().out
    for unit in ("trace", "features", "ablations", "attribution", "role_ablations", "circuit"):
        assert f"{unit}: finished by an earlier run, skipped" in printed


def test_truncated_unit_is_redone_and_matches(run, copy_of_run):
    original = pd.read_parquet(run / "ablations.parquet")
    path = copy_of_run / "ablations.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a half-written file
    others = {k: v for k, v in _table_mtimes(copy_of_run).items() if k != "ablations.parquet"}
    analyze_tables([*analyze_args(run.parent / "tiny-unet"), "--out", str(copy_of_run)])
    redone = pd.read_parquet(path)
    pd.testing.assert_frame_equal(redone, original, rtol=1e-6)
    after = _table_mtimes(copy_of_run)
    assert {k: after[k] for k in others} == others  # only the broken unit was recomputed


def test_unit_whose_inputs_changed_is_redone(run, copy_of_run):
    # as if the trace had been recomputed to other numbers after "features" read it
    manifest_path = copy_of_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["units"]["features"]["inputs"]) == {"trace"}
    manifest["units"]["features"]["inputs"]["trace"]["aggregates.parquet"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    before = _table_mtimes(copy_of_run)
    analyze_tables([*analyze_args(run.parent / "tiny-unet"), "--out", str(copy_of_run)])
    after = _table_mtimes(copy_of_run)
    assert after["features_maps.parquet"] != before["features_maps.parquet"]
    unchanged = {k for k in before if k != "features_maps.parquet"}
    # the recomputed features equal the old ones, so role_ablations (which reads them) stays
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}


@pytest.mark.parametrize("other", [["--seed", "1"], ["--circuit-ablation", "mean"]])
def test_folder_of_another_configuration_is_refused(run, copy_of_run, capsys, other):
    before = _table_mtimes(copy_of_run)
    assert cli([*analyze_args(run.parent / "tiny-unet"), *other, "--out", str(copy_of_run)]) == 1
    assert "holds results of a different configuration" in capsys.readouterr().err
    assert _table_mtimes(copy_of_run) == before  # nothing overwritten


def test_memory_budget_chunks_passes_without_changing_results(run, tmp_path):
    from diffcirc.analysis.config import AnalysisConfig
    from diffcirc.analysis.phases import Experiment

    def ablate(max_memory):
        config = AnalysisConfig(out=str(tmp_path / str(max_memory)), model=str(run.parent / "tiny-unet"),
                                synthetic=8, natural="lfw", natural_n=8, timesteps=[100, 600],
                                ablation_timesteps=[600], ablation_images=8, max_batch=max_batch,
                                max_memory=max_memory)
        exp = Experiment(config)
        passes = []
        handle = exp.unet.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
        exp.ablations()
        handle.remove()
        return exp.tables["ablations"], passes

    max_batch = 16  # 2 conditions of 8 images: a step runs more, so an unbounded budget fills passes to it
    tight, tight_passes = ablate(1)  # below one condition's activations: one condition (8 images) per pass
    loose, loose_passes = ablate(1 << 40)
    assert max(tight_passes) == 8 and max(loose_passes) == max_batch
    assert len(tight_passes) > len(loose_passes)
    pd.testing.assert_frame_equal(tight, loose, rtol=1e-5)
    saved = pd.read_parquet(run / "ablations.parquet")
    pd.testing.assert_frame_equal(loose, saved, rtol=1e-5)


def test_killed_run_resumes_to_identical_results(run, tmp_path):
    import time

    out = tmp_path / "killed"
    args = [*analyze_args(run.parent / "tiny-unet"), "--out", str(out)]
    proc = _cli_process(args)
    manifest = out / "manifest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.is_alive():
            if manifest.exists() and "features" in json.loads(manifest.read_text()).get("units", {}):
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: nothing of the run's own clean-up happens
        proc.join()
    finished = set(json.loads(manifest.read_text())["units"])
    assert {"trace", "features"} <= finished and "circuit" not in finished, finished
    kept = {name: (out / name).stat().st_mtime_ns for name in ("aggregates.parquet", "features_maps.parquet")}
    analyze_tables(args)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not computed twice
    for name in ("aggregates", "histograms", "per_image", "ablations", "attribution", "role_ablations", "circuit"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(run / f"{name}.parquet"),
                                      rtol=1e-6)


def _sorted(frame, values):
    keys = [c for c in frame.columns if c not in values]
    return frame.sort_values(keys).reset_index(drop=True)


def _assert_close(a, b, path="summary"):
    """Recursive equality of two JSON values, numbers within float tolerance."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        # abs: percent changes of losses equal to ~1e-6 relative are ~1e-4 percentage points apart
        assert b == pytest.approx(a, rel=1e-4, abs=1e-3, nan_ok=True), path
    else:
        assert a == b, path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world: int, port: int) -> dict:
    """The environment ``torchrun --standalone --nproc_per_node=WORLD`` gives the process of RANK
    (torch.distributed.run's rendezvous, set by hand): what Ranks.from_env reads."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def test_two_processes_give_the_results_of_one(run, tmp_path):
    """Two processes in torchrun's environment (gloo on the CPU) shard images, conditions and steps;
    the merged tables and the summary equal the one-process run's. The processes are forked copies
    of this one (``_cli_process``), not torchrun's fresh interpreters: the same ranks, environment
    and process group, without three interpreter start-ups."""
    out = tmp_path / "two"
    args = [*analyze_args(run.parent / "tiny-unet"), "--out", str(out)]
    port = _free_port()
    ranks = [_cli_process(args, _torchrun_env(rank, 2, port), log=tmp_path / f"rank{rank}") for rank in range(2)]
    for proc in ranks:
        proc.join(timeout=900)
    for rank, proc in enumerate(ranks):
        if proc.is_alive():
            proc.kill()
        assert proc.exitcode == 0, (rank, (tmp_path / f"rank{rank}.err").read_text()[-4000:])
    assert json.loads((out / "meta.json").read_text())["processes"] == 2
    values = {"count", "mean", "std", "m2", "loss_clean", "loss_ablated", "score", "err_clean", "err_ablated",
              "degradation", "kept", "entropy", "edge_corr", "texture_corr"}
    for name in ("aggregates", "per_image", "maps", "features_maps", "ablations", "attribution", "role_ablations"):
        one, two = pd.read_parquet(run / f"{name}.parquet"), pd.read_parquet(out / f"{name}.parquet")
        assert len(two) == len(one), name
        pd.testing.assert_frame_equal(_sorted(two, values), _sorted(one, values), rtol=1e-4, atol=1e-6,
                                      check_dtype=False, obj=name)
    # histograms: the same samples, but a value within rounding of a bin edge may land on either side
    # (two processes run batches of other sizes, so GEMMs round differently)
    one, two = (_sorted(pd.read_parquet(f / "histograms.parquet"), values) for f in (run, out))
    pd.testing.assert_frame_equal(two.drop(columns="count"), one.drop(columns="count"), obj="histograms")
    assert two["count"].sum() == one["count"].sum()
    assert (two["count"] - one["count"]).abs().sum() <= 1e-3 * one["count"].sum()
    one, two = json.loads((run / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    one.pop("meta"), two.pop("meta")
    _assert_close(two, one)


# -- rows recomputed outside the driver ------------------------------------------------------------

@pytest.fixture(scope="module")
def direct(run, single_thread):
    """The run's model, a Session on it, and the natural images of its ablation batch at t = 600
    noised with the same per-image noise, rebuilt from the data and model layers (not the driver);
    one thread for its tiny passes (see ``single_thread``)."""
    from diffcirc.analysis.config import noise_for
    from diffcirc.data import load_dataset
    from diffcirc.models import load
    from diffcirc.processor import Session

    unet, scheduler = load(str(run.parent / "tiny-unet"))
    t, n = 600, 8
    natural = load_dataset("lfw", size=32, n=n, seed=0, split="heldout")
    x0 = torch.stack([natural[i]["image"] for i in range(n)]).float()
    eps = noise_for(0, 1, range(n), t, x0.shape[1:])  # seed 0; dataset 1 = natural
    a = scheduler.alphas_cumprod[t].float()
    return SimpleNamespace(unet=unet, session=Session(unet), t=t, eps=eps, x_t=a.sqrt() * x0 + (1 - a).sqrt() * eps)


def _losses(direct, interventions) -> torch.Tensor:
    """(B,) ε-MSE per image with these interventions installed."""
    tt = torch.full((direct.x_t.shape[0],), direct.t, dtype=torch.long)
    with torch.no_grad(), direct.session.intervene(interventions):
        eps_hat = direct.unet(direct.x_t, tt).sample
    return (eps_hat - direct.eps).square().flatten(1).mean(1)


def test_ablation_rows_equal_a_direct_zero_ablation_of_their_head(run, direct):
    from diffcirc.processor import Zero

    rtol = 1e-5  # batched passes round differently from one pass of 8 images: ~2e-7 seen
    abl = pd.read_parquet(run / "ablations.parquet")
    zero = abl[(abl.dataset == "natural") & (abl.timestep == direct.t) & (abl["mode"] == "zero")]
    clean = _losses(direct, []).double()
    ours = {}
    for layer, h in direct.session.heads():
        ours[layer, h] = _losses(direct, [Zero(layer, h)]).double()
        rows = zero[(zero.layer == layer) & (zero["head"] == h)].sort_values("image")
        assert rows["image"].tolist() == list(range(8)), (layer, h)
        torch.testing.assert_close(torch.tensor(rows["loss_ablated"].to_numpy()), ours[layer, h], rtol=rtol, atol=0,
                                   msg=f"{layer} head {h}")
        torch.testing.assert_close(torch.tensor(rows["loss_clean"].to_numpy()), clean, rtol=rtol, atol=0)
    # the check can fail: a row holding its neighbour head's losses would be off by far more than rtol
    gaps = [float(((ours[layer, h] - ours[layer, h + 1]).abs() / clean).max())
            for layer, h in direct.session.heads() if (layer, h + 1) in ours]
    assert min(gaps) > 10 * rtol, gaps


def test_circuit_steps_equal_a_direct_ablation_of_the_removed_heads_on_the_selection_split(run, direct):
    from diffcirc.analysis.circuit import resample_weights, split_images
    from diffcirc.processor import Zero

    selection, heldout = split_images(range(8), 0.5, seed=0, dataset=1)  # the natural ablation images
    circuit = pd.read_parquet(run / "circuit.parquet")
    trace = circuit[circuit.dataset == "natural"].sort_values("step")
    assert len(trace) == len(direct.session.heads()) and set(trace.timestep) == {direct.t}
    clean = _losses(direct, []).double()
    removed = []
    for row in trace.itertuples():
        candidate = (row.removed_layer, int(row.removed_head))
        loss = _losses(direct, [Zero(layer, h) for layer, h in [*removed, candidate]]).double()
        on_selection = 100 * (loss[selection].mean() - clean[selection].mean()) / clean[selection].mean()
        assert row.degradation == pytest.approx(float(on_selection), abs=1e-3), row
        assert row.kept == (row.degradation >= 10.0)  # --circuit-threshold's default
        if not row.kept:
            removed.append(candidate)
    assert removed, "no head was pruned: the steps above tested nothing cumulative"
    # the held-out rows are the circuit's removed heads ablated on the other images, at every ablation timestep
    ev = pd.read_parquet(run / "circuit_eval.parquet")
    held = ev[(ev.dataset == "natural") & (ev.split == "heldout") & (ev.condition == "circuit")].sort_values("image")
    assert held["image"].tolist() == heldout and set(held.timestep) == {direct.t}
    assert (held.n_removed == len(removed)).all()
    loss = _losses(direct, [Zero(layer, h) for layer, h in removed]).double()
    assert held["loss_ablated"].to_numpy() == pytest.approx(loss[heldout].numpy(), rel=1e-5)
    assert held["loss_clean"].to_numpy() == pytest.approx(clean[heldout].numpy(), rel=1e-5)
    (row,) = [r for r in json.loads((run / "summary.json").read_text())["circuit"]["evaluation"]
              if r["dataset"] == "natural"]
    expected = 100 * (loss[heldout].mean() - clean[heldout].mean()) / clean[heldout].mean()
    assert row["heldout_percent"] == pytest.approx(float(expected), abs=1e-3) and row["selected"]
    md = (run / "report.md").read_text()
    assert f"| natural | {direct.t} * | {len(removed)} | 4 / 4 |" in md[md.index("## Minimal circuits"):]
    sel = ev[(ev.dataset == "natural") & (ev.split == "selection")]
    assert set(sel.condition) == {"circuit"} and sorted(sel.image) == selection
    # a resample's first step weighs the selection images by their bootstrap counts
    first = pd.read_parquet(run / "circuit_resamples.parquet").query("dataset == 'natural' and resample == 0 and step == 0")
    w = torch.tensor(resample_weights(len(selection), 2, seed=0, dataset=1)[0], dtype=torch.float64)
    loss = _losses(direct, [Zero(first.removed_layer.iloc[0], int(first.removed_head.iloc[0]))]).double()
    expected = 100 * (w @ loss[selection] - w @ clean[selection]) / (w @ clean[selection])
    assert float(first.degradation.iloc[0]) == pytest.approx(float(expected), abs=1e-3)


def test_role_rows_equal_a_direct_ablation_of_the_role_and_its_matched_sets(run, direct, tmp_path, monkeypatch):
    """Each role_ablations row (eps_mse) holds the loss of its own head set: the role's heads, or
    the layer-matched random set its rep names, redrawn here from the seed and the role's name.
    The roles are planted (two heads of the first layer, one of each other layer), so that
    matched sets exist in a model of two heads per layer."""
    from diffcirc.analysis import phases
    from diffcirc.analysis.config import AnalysisConfig
    from diffcirc.analysis.roles import layer_matched_sets, role_set_seed
    from diffcirc.processor import Zero

    heads = direct.session.heads()
    planted = {heads[0]: "local_smoothing", heads[1]: "local_smoothing", heads[2]: "edge_detection",
               heads[4]: "edge_detection"}

    def assign(features, rules=None):
        return features.assign(role=[planted.get((r.layer, int(r.head)), "unassigned") for r in features.itertuples()])

    monkeypatch.setattr(phases, "assign_roles", assign)
    config = AnalysisConfig(out=str(tmp_path), model=str(run.parent / "tiny-unet"), synthetic=8, natural="lfw",
                            natural_n=8, timesteps=[100, 600], ablation_timesteps=[600], ablation_images=8,
                            role_control_reps=2)
    exp = phases.Experiment(config)
    exp.tables.update({name: pd.read_parquet(run / f"{name}.parquet") for name in ("aggregates", "layers")})
    exp.role_ablations()
    ra = exp.tables["role_ablations"]
    ra = ra[(ra.dataset == "natural") & (ra.error_name == "eps_mse")]
    checked = {"role": 0, "random": 0}
    for role, g in ra.groupby("role"):
        members = [lh for lh, r in planted.items() if r == role]
        sets = layer_matched_sets(heads, members, 2, role_set_seed(0, role))
        assert set(g.loc[g.control == "random", "rep"]) == set(range(len(sets))), role
        for (control, rep), rows in g.groupby(["control", "rep"]):
            chosen = members if control == "role" else sets[rep]
            rows = rows.sort_values("image")
            want = _losses(direct, [Zero(layer, h) for layer, h in chosen]).double()
            torch.testing.assert_close(torch.tensor(rows["err_ablated"].to_numpy()), want, rtol=1e-5, atol=0,
                                       msg=f"{role} {control} {rep}")
            checked[control] += 1
    # edge_detection's matched set is (layer 1, head 1), (layer 2, head 1); local smoothing holds all of layer 0
    assert checked == {"role": 2, "random": 1}


def test_uniform_label_mass_rows_match_the_label_maps(run):
    from diffcirc.data import load_dataset
    from diffcirc.processor.grid import labels_to_grid

    agg = pd.read_parquet(run / "aggregates.parquet")
    uniform = agg[agg.stat == "label_mass_uniform"]
    layers = pd.read_parquet(run / "layers.parquet")
    assert len(uniform) == 2 * 2 * 2 * int(layers.heads.sum())  # models x datasets x timesteps x heads
    for name, spec in (("synthetic", "synthetic-gray"), ("natural", "lfw")):
        dataset = load_dataset(spec, size=32, n=8, seed=0, split="heldout")
        labels = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(8)]).long()
        for layer in layers.itertuples():
            tokens = labels_to_grid(labels, (int(layer.grid_h), int(layer.grid_w))).numpy()
            shares = [sum((count / row.size) ** 2 for count in np.unique(row, return_counts=True)[1]) for row in tokens]
            rows = uniform[(uniform.dataset == name) & (uniform.layer == layer.layer)]
            assert rows["mean"].to_numpy() == pytest.approx(np.full(len(rows), np.mean(shares)), rel=1e-12)
            assert (rows["count"] == 8).all()


# -- one run per output folder ---------------------------------------------------------------------

def _hold_until_killed(folder, held):
    """A running analysis, as far as the folder lock can tell: holds folder until SIGKILL."""
    import time

    from diffcirc.analysis.folder_lock import hold_folder

    with hold_folder(folder):
        held.set()
        while True:
            time.sleep(60)


def test_second_run_on_a_held_folder_refuses_at_once_naming_the_running_pid(run, tmp_path, capsys):
    import multiprocessing

    from diffcirc.analysis.folder_lock import LOCK_FILE, hold_folder

    out = tmp_path / "busy"
    # a forked copy of this process: a holder with a pid of its own that runs nothing of torch, so
    # it needs no start-up of its own (the killed run and --wait below start real analyses)
    fork = multiprocessing.get_context("fork")
    held = fork.Event()
    holder = fork.Process(target=_hold_until_killed, args=(str(out), held), daemon=True)
    holder.start()
    try:
        assert held.wait(timeout=60)
        assert cli([*analyze_args(run.parent / "tiny-unet"), "--out", str(out)]) == 1
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's runs after this; the OS releases its lock
        holder.join()
    err = capsys.readouterr().err
    assert err.startswith("diffcirc analyze: error:") and "Traceback" not in err, err
    assert f"in use by another analysis run (pid {holder.pid})" in err and "--wait" in err, err
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # refused before anything was computed
    with hold_folder(out):  # the killed holder's lock is gone
        pass


def test_wait_waits_for_the_running_one_then_resumes_from_its_finished_units(run, copy_of_run, tmp_path):
    import time

    from diffcirc.analysis.folder_lock import hold_folder

    before = _table_mtimes(copy_of_run)
    args = [*analyze_args(run.parent / "tiny-unet"), "--out", str(copy_of_run), "--wait"]
    log = tmp_path / "waiter"
    # forked before this process takes the lock: a child forked inside the block would share the
    # lock's open file, so the lock would outlive the block and the child would wait for itself
    held = FORK.Event()
    waiter = _cli_process(args, log=log, start=held)
    try:
        with hold_folder(copy_of_run):  # this process is the running analysis
            held.set()
            deadline, err = time.time() + 120, ""
            while "waiting" not in err and time.time() < deadline and waiter.is_alive():
                time.sleep(0.02)
                err = log.with_suffix(".err").read_text() if log.with_suffix(".err").exists() else ""
            assert f"in use by another analysis run (pid {os.getpid()}); waiting for it to end" in err, err
            assert waiter.is_alive()  # blocked while the folder is held
        waiter.join(timeout=600)
    finally:
        if waiter.is_alive():
            waiter.kill()
    stdout, stderr = (log.with_suffix(suffix).read_text() for suffix in (".out", ".err"))
    assert waiter.exitcode == 0, stderr[-3000:]
    for unit in ("trace", "features", "ablations", "attribution", "role_ablations", "circuit"):
        assert f"{unit}: finished by an earlier run, skipped" in stdout
    assert _table_mtimes(copy_of_run) == before


def test_divergence_null_observes_the_divergence_of_the_head_histograms(run):
    """The per-image histograms the null permutes sum, over images and heads, to the per-head
    histograms the divergence is computed from: the observed value of the null is the divergence."""
    summary = json.loads((run / "summary.json").read_text())["entropy_divergence"]
    null = summary["null"]
    assert set(null["per_timestep"]) == set(summary["per_timestep"]) == {"100", "600"}
    for t, row in null["per_timestep"].items():
        assert row["js"] == pytest.approx(summary["per_timestep"][t], rel=1e-9)
        assert null["p_floor"] <= row["p_value"] <= 1 and row["null_mean"] > 0
    per_image = pd.read_parquet(run / "image_histograms.parquet")
    heads = pd.read_parquet(run / "histograms.parquet").query("stat == 'entropy'")
    keys = ["model", "dataset", "timestep", "layer", "bin"]
    summed = per_image.groupby(keys)["count"].sum()
    pooled = heads.groupby(keys)["count"].sum()
    pd.testing.assert_series_equal(summed, pooled[pooled > 0], check_dtype=False)


def test_attribution_reports_integrated_gradients_beside_first_order_scores(run):
    att = pd.read_parquet(run / "attribution.parquet")
    assert {"score", "score_ig"} <= set(att.columns) and not np.allclose(att.score, att.score_ig)
    summary = json.loads((run / "summary.json").read_text())["attribution_spearman"]
    deg = metrics.degradation(pd.read_parquet(run / "ablations.parquet"), n_resamples=0)
    ig = summary["integrated"]
    assert ig["rho"] == pytest.approx(metrics.attribution_agreement(att, deg, score="score_ig")["rho"])
    assert ig["n"] == summary["n"] and ig["rho"] != summary["rho"]
