"""``diffcirc recompute``: rows of a finished run's ablations and circuit_eval tables rerun on their
image alone agree with the batched, stage-reused passes that wrote them; a changed row is reported
(exit 1); requests that cannot be recomputed exit 2."""

import shutil

import pandas as pd
import pytest

from diffcirc.analysis.recompute import RTOL, TABLES, recompute, recompute_ablation

TOLERANCE = RTOL["float32"]
from diffcirc.cli import main as cli
from helpers.analysis_models import save_analysis_unet


def _finished_run(root, *extra):
    """A finished run on a tiny random UNet: 4 images per dataset (2 selection, 2 held out), zero and
    mean single-head ablations, a circuit under a threshold low enough that it keeps some heads (so
    that 4 random sets of its removed-set size are evaluated); extra: more `analyze` options."""
    from diffcirc.analysis.driver import run_analysis
    from diffcirc.cli import build_parser
    from diffcirc.cli.analyze import config_from_args

    out = root / "out"
    argv = ["analyze", "--model", str(save_analysis_unet(root / "tiny-unet")), "--synthetic", "4", "--natural", "lfw",
            "--natural-n", "4", "--ablation-images", "4", "--role-control-reps", "1", "--no-random-control",
            "--circuit-threshold", "0.001", "--circuit-random-sets", "4", "--out", str(out), *extra]
    run_analysis(config_from_args(build_parser().parse_args(argv)))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_thread):
    """Single-head ablations at t = 600, the circuit's heads zero-ablated."""
    return _finished_run(tmp_path_factory.mktemp("recompute"), "--timesteps", "600")


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory, single_thread):
    """The circuit's heads mean-ablated, at t = 100 (where the tiny model's circuit keeps heads under
    mean ablation: at 600 removing every head costs nothing and no random set is drawn)."""
    return _finished_run(tmp_path_factory.mktemp("recompute-mean"), "--timesteps", "100", "--circuit-ablation", "mean")


def _rows(run) -> pd.DataFrame:
    """Per mode and dataset, the row of image 2 (not the first of its batch) whose ablation moves
    the loss most: the recomputation must tell it from its neighbours."""
    abl = pd.read_parquet(run / "ablations.parquet")
    abl = abl[abl.image == 2].assign(effect=lambda f: (f.loss_ablated / f.loss_clean - 1).abs())
    return abl.loc[abl.groupby(["mode", "dataset"])["effect"].idxmax()]


def test_rows_rerun_alone_agree_with_the_batched_run(run):
    rows = _rows(run)
    for k, stored in rows.iterrows():
        r = recompute_ablation(run, int(k))
        assert r.key == {c: stored[c] for c in ("dataset", "timestep", "layer", "head", "mode", "image")}
        assert r.recomputed["loss_clean"] == pytest.approx(stored["loss_clean"], rel=TOLERANCE)
        assert r.recomputed["loss_ablated"] == pytest.approx(stored["loss_ablated"], rel=TOLERANCE)
        assert r.agrees and r.rtol == TOLERANCE
        assert stored["effect"] > 10 * TOLERANCE  # another head's or image's row would not agree


def test_the_command_prints_both_and_reports_a_changed_row(run, tmp_path, capsys):
    row = _rows(run).iloc[0]
    k = int(row.name)
    assert cli(["recompute", str(run), "--row", str(k)]) == 0
    out = capsys.readouterr().out
    assert f"ablations row {k}: dataset {row.dataset}, timestep 600, layer {row.layer}, head {row['head']}" in out
    assert "agrees" in out and out.count("stored") == 2
    changed = shutil.copytree(run, tmp_path / "changed")
    abl = pd.read_parquet(changed / "ablations.parquet")
    abl.loc[k, "loss_ablated"] *= 1.01
    abl.to_parquet(changed / "ablations.parquet")
    assert cli(["recompute", str(changed), "--row", str(k), str(k + 1)]) == 1
    out = capsys.readouterr().out
    assert out.count("DIFFERS") == 1 and out.count("agrees") == 1


def _eval_rows(folder) -> pd.DataFrame:
    """Per (split, condition) of the natural dataset, the circuit_eval row of the split's last image
    (not the first of its batch) whose removal moves the loss most."""
    ev = pd.read_parquet(folder / "circuit_eval.parquet")
    ev = ev[(ev.dataset == "natural") & (ev.image == ev.groupby(["dataset", "split"]).image.transform("max"))]
    ev = ev.assign(effect=lambda f: (f.loss_ablated / f.loss_clean - 1).abs())
    return ev.loc[ev.groupby(["split", "condition"])["effect"].idxmax()]


@pytest.mark.parametrize("folder, mode", [("run", "zero"), ("mean_run", "mean")])
def test_circuit_eval_rows_rerun_alone_agree_with_the_batched_run(folder, mode, request):
    folder = request.getfixturevalue(folder)
    rows = _eval_rows(folder)
    assert set(zip(rows.split, rows.condition)) == {("selection", "circuit"), ("heldout", "circuit"),
                                                    ("heldout", "random")}
    for k, stored in rows.iterrows():
        r = recompute(folder, "circuit_eval", int(k))
        assert r.key == {c: stored[c] for c in ("dataset", "split", "timestep", "condition", "mode", "rep", "image")}
        assert r.key["mode"] == mode
        assert r.recomputed["loss_clean"] == pytest.approx(stored["loss_clean"], rel=TOLERANCE)
        assert r.recomputed["loss_ablated"] == pytest.approx(stored["loss_ablated"], rel=TOLERANCE)
        assert r.agrees and r.rtol == TOLERANCE
        assert stored["effect"] > 10 * TOLERANCE  # another set's, split's means or image's row would not agree


def test_a_circuit_eval_row_with_a_changed_loss_or_rep_differs(run, tmp_path, capsys):
    ev = pd.read_parquet(run / "circuit_eval.parquet")
    row = _eval_rows(run).query("condition == 'random'").iloc[0]
    k = int(row.name)
    # another random set whose loss on this image is far from the row's: its rep written into the row
    others = ev[(ev.dataset == row.dataset) & (ev.condition == "random") & (ev.image == row.image)]
    other = others[(others.loss_ablated / row.loss_ablated - 1).abs() > 10 * TOLERANCE].iloc[0]
    changed = shutil.copytree(run, tmp_path / "changed")
    ev.loc[k, "rep"] = other.rep
    ev.loc[k + 1, "loss_ablated"] *= 1.01
    ev.to_parquet(changed / "circuit_eval.parquet")
    assert cli(["recompute", str(changed), "--table", "circuit_eval", "--row", str(k), str(k + 1), "0"]) == 1
    out = capsys.readouterr().out
    assert f"circuit_eval row {k}: dataset natural, split heldout, timestep 600, condition random, mode zero, " \
           f"rep {other.rep}, image {row.image}" in out
    assert out.count("DIFFERS") == 2 and out.count("agrees") == 1


@pytest.mark.parametrize("extra, message", [
    (["--row", "100000"], "--row 100000: ablations.parquet has rows 0 to"),
    (["--row", "100000", "--table", "circuit_eval"], "--row 100000: circuit_eval.parquet has rows 0 to"),
    (["--row", "0", "--table", "circuit"], "--table 'circuit': rows of ablations, circuit_eval, role_ablations can be "
                                            "recomputed"),
])
def test_requests_that_cannot_be_recomputed_exit_2(run, capsys, extra, message):
    assert cli(["recompute", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffcirc recompute: error:") and message in err, err


def _changed_eval(run, folder, k: int, column: str, value):
    ev = pd.read_parquet(run / "circuit_eval.parquet")
    ev.loc[k, column] = value
    ev.to_parquet(folder / "circuit_eval.parquet")


@pytest.mark.parametrize("change, message", [
    (lambda run, folder, k: (folder / "circuit.parquet").unlink(), "has no circuit.parquet"),
    (lambda run, folder, k: _changed_eval(run, folder, k, "mode", "mean"), "mode 'mean' is not the run's circuit "
                                                                            "ablation 'zero'"),
    (lambda run, folder, k: _changed_eval(run, folder, k, "condition", "shuffled"), "condition 'shuffled': not a row"),
    (lambda run, folder, k: _changed_eval(run, folder, k, "rep", 99), "no random set 99 on the heldout split"),
    (lambda run, folder, k: _changed_eval(run, folder, k, "split", "selection"), "is not in the natural selection "
                                                                                  "split"),
], ids=["no circuit.parquet", "another mode", "unknown condition", "rep out of range", "image of another split"])
def test_circuit_eval_rows_that_cannot_be_reproduced_exit_2(run, tmp_path, capsys, change, message):
    k = int(_eval_rows(run).query("condition == 'random'").index[0])
    folder = shutil.copytree(run, tmp_path / "changed")
    change(run, folder, k)
    assert cli(["recompute", str(folder), "--table", "circuit_eval", "--row", str(k)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffcirc recompute: error:") and message in err, err


def test_the_help_names_every_recomputable_table(capsys):
    with pytest.raises(SystemExit):
        cli(["recompute", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(table in help_text for table in TABLES)


def test_a_folder_without_a_finished_run_exits_2(tmp_path, capsys):
    assert cli(["recompute", str(tmp_path), "--row", "0"]) == 2
    assert "no finished run's meta.json" in capsys.readouterr().err


def _role_rows(run) -> pd.DataFrame:
    """Per error, the role_ablations row of image 2 (not the first of its batch) of the natural
    dataset whose ablation moves the error most."""
    roles = pd.read_parquet(run / "role_ablations.parquet")
    roles = roles[(roles.dataset == "natural") & (roles.image == 2)]
    roles = roles.assign(effect=lambda f: (f.err_ablated / f.err_clean - 1).abs())
    return roles.loc[roles.groupby("error_name")["effect"].idxmax()]


def test_role_ablation_rows_rerun_alone_agree_with_the_batched_run(run):
    rows = _role_rows(run)
    assert set(rows.error_name) == {"eps_mse", "edge", "high_freq", "part"}
    for k, stored in rows.iterrows():
        r = recompute(run, "role_ablations", int(k))
        assert r.key == {c: stored[c] for c in ("dataset", "timestep", "role", "control", "rep", "image", "error_name")}
        assert r.recomputed["err_clean"] == pytest.approx(stored["err_clean"], rel=TOLERANCE)
        assert r.recomputed["err_ablated"] == pytest.approx(stored["err_ablated"], rel=TOLERANCE)
        assert r.agrees and stored["effect"] > 10 * TOLERANCE


def test_a_changed_role_ablation_row_differs_and_an_unknown_role_exits_2(run, tmp_path, capsys):
    k = int(_role_rows(run).index[0])
    changed = shutil.copytree(run, tmp_path / "changed")
    roles = pd.read_parquet(run / "role_ablations.parquet")
    roles.loc[k, "err_ablated"] *= 1.01
    roles.loc[k + 1, "role"] = "no_such_role"
    roles.to_parquet(changed / "role_ablations.parquet")
    assert cli(["recompute", str(changed), "--table", "role_ablations", "--row", str(k)]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert cli(["recompute", str(changed), "--table", "role_ablations", "--row", str(k + 1)]) == 2
    assert "role 'no_such_role', control 'role', rep 0: not a condition" in capsys.readouterr().err
