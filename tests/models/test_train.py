"""DDPM training: the loss goes down, checkpoints hold no pickle, and a resumed run equals an uninterrupted one."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffcirc.models import load
from diffcirc.models.evaluate import eps_mse
from diffcirc.models.train import TrainConfig, build_training_data, train

DATA = "synthetic:12,synthetic-gray:12,lfw-train:8"


def _cfg(out, steps, **kw):
    return TrainConfig(out=str(out), data=DATA, size=32, steps=steps, batch_size=4, lr=1e-3, warmup=2,
                       checkpoint_every=10, sample_every=0, log_every=5, progress=False, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    state = train(_cfg(out, 20))
    return out, state


def test_training_lowers_the_loss(uninterrupted):
    out, state = uninterrupted
    images, weights, parts = build_training_data(DATA, 32)
    assert images.shape == (12 + 12 + 160, 3, 32, 32)
    assert [p["count"] for p in parts] == [12, 12, 8] and [p["seed"] for p in parts] == [0, 100_000, 200_000]
    torch.testing.assert_close(weights.sum(), torch.tensor(32.0, dtype=torch.float64))
    from diffcirc.models.unet import build_scheduler, build_unet

    torch.manual_seed(0)  # the initialisation train() starts from (cfg.seed = 0)
    before = build_unet(32).eval()
    after = build_unet(32).eval()
    after.load_state_dict(load_file(os.path.join(out, "checkpoint", "model.safetensors")))
    batch = images[:: len(images) // 16][:16]
    ts = (100, 500, 900)
    loss_before = sum(eps_mse(before, build_scheduler(), batch, ts).values())
    loss_after = sum(eps_mse(after, build_scheduler(), batch, ts).values())
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert len(state["losses"]) == 20 and state["step"] == 20


def test_outputs_are_safetensors_and_json(uninterrupted):
    out, _ = uninterrupted
    assert sorted(os.listdir(out / "checkpoint")) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "state.json"]
    assert sorted(os.listdir(out / "ema")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                               "scheduler_config.json", "training.json"]
    info = json.loads((out / "ema" / "training.json").read_text())
    assert info["steps"] == 20 and info["data"] == DATA
    unet, scheduler = load(str(out / "ema"))  # the export is a loadable diffusers folder
    ema = load_file(os.path.join(out, "checkpoint", "ema.safetensors"))
    torch.testing.assert_close(unet.state_dict()["conv_in.weight"], ema["conv_in.weight"])
    assert scheduler.config.num_train_timesteps == 1000
    assert len((out / "log.jsonl").read_text().splitlines()) == 4


def test_resume_gives_identical_state(uninterrupted, tmp_path):
    from diffcirc.cli import main

    full_out, full = uninterrupted
    # first half through the CLI (also checks its wiring), "interrupted" after the step-10 checkpoint
    assert main(["train", "--out", str(tmp_path), "--data", DATA, "--size", "32", "--steps", "10", "--batch-size", "4",
                 "--lr", "1e-3", "--warmup", "2", "--checkpoint-every", "10", "--sample-every", "10",
                 "--sample-steps", "2", "--log-every", "5", "--no-progress"]) == 0
    assert (tmp_path / "samples" / "step_0000010.png").is_file()
    resumed = train(_cfg(tmp_path, 20))
    assert resumed["losses"][:10] == full["losses"][:10]
    assert resumed["losses"][10] == full["losses"][10]  # the first step after resuming
    assert resumed["losses"] == full["losses"]
    for name in ("model", "ema", "optimizer", "rng"):
        a = load_file(os.path.join(full_out, "checkpoint", f"{name}.safetensors"))
        b = load_file(os.path.join(tmp_path, "checkpoint", f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k}"


def test_resume_refuses_a_different_setup(uninterrupted):
    out, _ = uninterrupted
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(out=str(out), data="synthetic:12", size=32, steps=30, batch_size=4, progress=False))
