"""Argument checks of the commands: out-of-range values are usage errors at parse time, broken inputs
found while working are one-line errors, and output folders that cannot be written fail up front."""

import os
import re

import pytest

from diffcirc.cli import main as cli
from diffcirc.cli._checks import check_writable_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("single_thread")


# -- 4. CLI values out of range ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["analyze", "--synthetic", "0"], "argument --synthetic: must be > 0"),
    (["analyze", "--natural-n", "-4"], "argument --natural-n: must be > 0"),
    (["analyze", "--timesteps", "10,1000"], r"argument --timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--timesteps=-1"], r"argument --timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--timesteps", "100,100"], "argument --timesteps: timesteps must be distinct"),
    (["analyze", "--ablation-timesteps", "1200"], r"argument --ablation-timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--natural", "imagenet"], "argument --natural: unknown dataset spec 'imagenet'"),
    (["analyze", "--natural", "folder:MISSING"], "argument --natural: .*does not exist"),
    (["analyze", "--natural", "celeba:MISSING"], "argument --natural: .*does not exist"),
    (["analyze", "--synthetic-spec", "faces"], "argument --synthetic-spec: invalid choice"),
    (["analyze", "--model", "bundeld"], "argument --model: 'bundeld' is neither 'bundled'"),
    (["analyze", "--model", "MISSING"], "argument --model: .* is neither 'bundled', an existing folder"),
    (["analyze", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["analyze", "--circuit-threshold", "nan"], "argument --circuit-threshold: must be a finite number"),
    (["analyze", "--max-memory", "1e400"], "argument --max-memory: size out of range"),
    (["analyze", "--ablation-modes", "zero,max"], "argument --ablation-modes: must be a comma-separated subset"),
    (["analyze", "--device", "gpu"], "argument --device: not a torch device"),
    (["train", "--steps", "0"], "argument --steps: must be > 0"),
    (["train", "--batch-size", "-2"], "argument --batch-size: must be > 0"),
    (["train", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--size", "48"], "argument --size: invalid choice: 48"),
    (["train", "--ema-decay", "1.5"], r"argument --ema-decay: must lie in \[0, 1\)"),
    (["train", "--sample-steps", "0"], r"argument --sample-steps: must lie in \[1, 1000\]"),
    (["train", "--data", "synthetic:0"], "argument --data: .*count of 'synthetic' must be >= 1"),
    (["train", "--data", "imagenet:50"], "argument --data: unknown dataset spec 'imagenet'"),
    (["train", "--data", "folder:MISSING:5"], "argument --data: .*does not exist"),
    (["train", "--data", "synthetic:200000,synthetic-gray:10"], "argument --data: .*never share a seed"),
    (["faces", "--n", "0"], "argument --n: must be > 0"),
    (["faces", "--n", "-5"], "argument --n: must be > 0"),
    (["faces", "--size", "0"], r"argument --size: must lie in \[8, 1024\]"),
    (["faces", "--seed", "-3"], "argument --seed: must be >= 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_value_out_of_range_is_a_usage_error(tmp_path, capsys, monkeypatch, argv, message):
    import diffcirc.analysis.driver as driver
    import diffcirc.data as data
    import diffcirc.models.train as training

    def never(*args, **kwargs):
        raise AssertionError("the command started working despite a bad argument")

    for module, name in ((driver, "run_analysis"), (training, "train"), (data, "export_faces")):
        monkeypatch.setattr(module, name, never)
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_reports_corrupt_weights_without_traceback(unet_dir, tmp_path, capsys):
    path = unet_dir / WEIGHTS
    path.write_bytes(path.read_bytes()[:4096])
    assert cli(["analyze", "--model", str(unet_dir), "--out", str(tmp_path / "out"), "--synthetic", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc analyze: error: weights file") and str(path) in err and "Traceback" not in err


def test_cli_reports_folder_without_images_without_traceback(saved_unet, tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    code = cli(["analyze", "--model", str(saved_unet), "--natural", f"folder:{empty}", "--synthetic", "2",
                "--out", str(tmp_path / "out")])
    assert code == 1
    assert f"image folder '{empty}' holds no images" in capsys.readouterr().err


# -- 5. output folder not writable ---------------------------------------------------------------------

@pytest.mark.parametrize("command", [["analyze"], ["train", "--steps", "1"], ["faces", "--n", "1"]],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("where", ["existing-file", "under-a-file"])
def test_output_folder_that_cannot_be_written_fails_up_front(tmp_path, capsys, monkeypatch, command, where):
    import diffcirc.analysis.driver as driver
    import diffcirc.data as data
    import diffcirc.models.train as training

    def never(*args, **kwargs):
        raise AssertionError("expensive work started before the output folder was checked")

    for module, name in ((driver, "run_analysis"), (training, "train"), (data, "export_faces")):
        monkeypatch.setattr(module, name, never)
    blocker = tmp_path / "results.txt"
    blocker.write_text("precious")
    out = blocker if where == "existing-file" else blocker / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli([*command, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = {"existing-file": "is an existing file, not a folder",
                "under-a-file": "results.txt' is a file, not a folder"}[where]
    assert "argument --out" in err and expected in err and "Traceback" not in err
    assert blocker.read_text() == "precious"  # nothing lost


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file cases above cover root")
def test_read_only_output_folder_fails_up_front(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli(["faces", "--n", "1", "--out", str(locked / "faces")])
        assert exit_info.value.code == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_writable_check_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert check_writable_folder(str(existing)) == str(existing)
    assert list(existing.iterdir()) == []  # the probe file is gone
    new = tmp_path / "a" / "b"
    assert check_writable_folder(str(new)) == str(new)
    assert not (tmp_path / "a").exists()  # checking does not create


def test_only_rank_0_of_a_torchrun_launch_checks_the_output_folder(tmp_path, monkeypatch):
    """Only rank 0 writes; the other ranks need not share its file system, so they do not probe it."""
    import argparse

    from diffcirc.cli._checks import writable_folder

    blocker = tmp_path / "results.txt"
    blocker.write_text("precious")
    for rank in (None, "0"):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        with pytest.raises(argparse.ArgumentTypeError, match="is an existing file"):
            writable_folder(str(blocker))
    monkeypatch.setenv("RANK", "1")
    assert writable_folder(str(blocker)) == str(blocker)
    assert blocker.read_text() == "precious"
