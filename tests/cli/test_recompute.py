"""``diffcirc recompute``: rows of a finished run's ablations table rerun on their image alone agree
with the batched, stage-reused passes that wrote them; a changed row is reported; bad requests exit 1."""

import pandas as pd
import pytest

from diffcirc.analysis.recompute import RTOL, recompute_ablation

TOLERANCE = RTOL["float32"]
from diffcirc.cli import main as cli
from helpers.analysis_models import save_analysis_unet


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_thread):
    """A finished run on a tiny random UNet: 4 images per dataset, zero and mean ablations at t = 600."""
    root = tmp_path_factory.mktemp("recompute")
    out = root / "out"
    argv = ["analyze", "--model", str(save_analysis_unet(root / "tiny-unet")), "--synthetic", "4", "--natural", "lfw",
            "--natural-n", "4", "--timesteps", "600", "--ablation-images", "4", "--role-control-reps", "1",
            "--no-random-control", "--out", str(out)]
    from diffcirc.analysis.driver import run_analysis
    from diffcirc.cli import build_parser
    from diffcirc.cli.analyze import config_from_args

    run_analysis(config_from_args(build_parser().parse_args(argv)))
    return out


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
    import shutil

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


@pytest.mark.parametrize("extra, message", [
    (["--row", "100000"], "--row 100000: ablations.parquet has rows 0 to"),
    (["--row", "0", "--table", "circuit"], "--table 'circuit': rows of ablations can be recomputed"),
])
def test_requests_that_cannot_be_recomputed_exit_1(run, capsys, extra, message):
    assert cli(["recompute", str(run), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc recompute: error:") and message in err, err


def test_a_folder_without_a_finished_run_exits_1(tmp_path, capsys):
    assert cli(["recompute", str(tmp_path), "--row", "0"]) == 1
    assert "no finished run's meta.json" in capsys.readouterr().err
