"""``diffcirc heatmaps`` refusals: options that do not fit the model, a folder without a usable
denoiser and conflicting prompt options exit with one clear line, before any denoiser pass."""

import json
import re

import pytest

from diffcirc.cli import main as cli
from helpers import tiny_pipelines as tp


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """One image, and the tiny SD and pixel pipelines."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("refusals")
    (root / "images").mkdir()
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / "a.png")
    for family in ("sd", "pixel"):
        tp.BUILDERS[family](root / family)
    return {"root": root, "images": f"folder:{root / 'images'}"}


def _argv(setup, family, out, *extra):
    return ["heatmaps", "--model", str(setup["root"] / family), "--images", setup["images"], "--out", str(out),
            "--size", str(tp.IMAGE_SIZE), "--threads", "1", *extra]


@pytest.mark.parametrize("family, extra, message", [
    ("pixel", [], "unconditional pixel model"),
    ("sd", ["--size", "30"], "--size 30 does not fit"),
    ("sd", ["--timesteps", "1000"], r"--timesteps: timestep 1000 is not an integer in \[0, 1000\)"),
    ("sd", ["--tokens", "8"], "--tokens 8 is out of range"),
])
def test_options_that_do_not_fit_the_model_exit_1(setup, tmp_path, capsys, family, extra, message):
    assert cli(_argv(setup, family, tmp_path / "out", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc heatmaps: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_a_folder_without_a_usable_denoiser_exits_1(tmp_path, capsys, setup):
    (tmp_path / "broken" / "vae").mkdir(parents=True)
    (tmp_path / "broken" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))
    argv = ["heatmaps", "--model", str(tmp_path / "broken"), "--images", setup["images"], "--out", str(tmp_path / "o")]
    assert cli(argv) == 1
    assert "no usable denoiser (unet/ is missing)" in capsys.readouterr().err


def test_prompt_and_prompt_embeds_are_exclusive(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(_argv(setup, "sd", tmp_path / "out", "--prompt", "x", "--prompt-embeds", "e.safetensors"))
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
