"""Training checkpoints that are truncated, of another model or of another configuration are refused
by name and kept on disk."""

import json

import pytest
import torch

from diffcirc.cli import main as cli
from diffcirc.models import CorruptWeightsError, WeightsMismatchError
from diffcirc.models.checkpoint import load_checkpoint, save_checkpoint
from diffcirc.models.train import TrainConfig, train

WEIGHTS = "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("single_thread")


def _linear_checkpoint(path, in_features=3):
    """A real checkpoint folder (one optimizer step, so the optimizer has state) of a tiny Linear model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(in_features, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, in_features)).sum().backward()
    opt.step()
    save_checkpoint(str(path), model=model, ema=dict(model.state_dict()), optimizer=opt,
                    generator=torch.Generator().manual_seed(0),
                    state={"step": 1, "losses": [1.0], "elapsed_s": 0.0, "config": {}})


def _restore_into(path, in_features=3):
    model = torch.nn.Linear(in_features, 2)
    return load_checkpoint(str(path), model=model, optimizer=torch.optim.AdamW(model.parameters()),
                           generator=torch.Generator())


def test_truncated_training_checkpoint_is_refused_and_kept(tmp_path):
    ckpt = tmp_path / "checkpoint"
    _linear_checkpoint(ckpt)
    _restore_into(ckpt)  # intact: restores
    bad = ckpt / "optimizer.safetensors"
    bad.write_bytes(bad.read_bytes()[:-4])
    before = bad.read_bytes()
    with pytest.raises(CorruptWeightsError, match="optimizer.safetensors.*not a complete safetensors file") as err:
        _restore_into(ckpt)
    assert "train from scratch" in str(err.value)
    assert bad.read_bytes() == before and (ckpt / "model.safetensors").is_file()  # nothing deleted or rewritten


def test_training_checkpoint_of_another_model_is_refused(tmp_path):
    _linear_checkpoint(tmp_path / "checkpoint", in_features=3)
    with pytest.raises(WeightsMismatchError, match="model.safetensors.*does not fit the model being trained"):
        _restore_into(tmp_path / "checkpoint", in_features=4)


def test_resume_with_another_size_names_the_setting(tmp_path):
    """The settings are compared before any tensor is loaded (else: a raw load_state_dict size mismatch)."""
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    saved = {"data": "synthetic:8", "size": 32, "batch_size": 4, "seed": 0}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "config": saved, "param_groups": []}))
    with pytest.raises(ValueError, match=r"different settings.*'size': \(32, 64\)"):
        train(TrainConfig(out=str(tmp_path), data="synthetic:8", size=64, steps=10, batch_size=4, progress=False))



def test_cli_resume_with_another_size_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    saved = {"data": "synthetic:8", "size": 32, "batch_size": 4, "seed": 0}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "config": saved, "param_groups": []}))
    code = cli(["train", "--out", str(tmp_path), "--data", "synthetic:8", "--size", "64", "--steps", "10",
                "--batch-size", "4", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc train: error: checkpoint in") and err.count("\n") == 1, err
    assert "'size': (32, 64)" in err and "Traceback" not in err
