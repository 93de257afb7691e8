"""``diffcirc heatmaps`` end to end on tiny pipelines saved with save_pretrained, offline.

The SD run is checked against an oracle that shares none of the command's code: diffusers' own
pipeline encodes the prompt and the VAE encodes the images, and a probe processor materialises
every cross-attention map of the UNet in float64; summed over heads, resampled to the latent grid
and averaged over layer calls and timesteps, they must equal the table. Also: the Flux (joint
attention, packed latents) run's sanity, resumption after a kill, a folder of other options, and
the --prompt-embeds path. Refusals are in test_heatmaps_refusals.py.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import diffcirc.cli.heatmaps as command
from diffcirc.analysis.config import noise_for
from diffcirc.cli import main as cli
from diffcirc.data import load_dataset
from diffcirc.models import Denoiser
from helpers import tiny_models as tm
from helpers import tiny_pipelines as tp

TIMESTEPS = (100, 700)
COLUMNS = ["image", "source", "token", "token_text", "row", "col", "value"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """Three images of other sizes than the model's, and the tiny SD, Flux and pixel pipelines."""
    root = tmp_path_factory.mktemp("heatmaps")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (32, 32), (50, 36)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    pipes = {family: tp.BUILDERS[family](root / family) for family in ("sd", "flux", "pixel")}
    return {"root": root, "images": f"folder:{images}", "pipes": pipes}


def _argv(setup, family, out, *extra):
    return ["heatmaps", "--model", str(setup["root"] / family), "--images", setup["images"], "--out", str(out),
            "--size", str(tp.IMAGE_SIZE), "--batch-size", "2", "--threads", "1",
            "--timesteps", ",".join(map(str, TIMESTEPS)), *extra]


@pytest.fixture(scope="module")
def sd_run(setup):
    out = setup["root"] / "out-sd"
    assert cli(_argv(setup, "sd", out, "--prompt", tp.PROMPT)) == 0
    return out


def test_writes_the_tables_overlays_and_meta(sd_run):
    table = pd.read_parquet(sd_run / "heatmaps.parquet")
    assert list(table.columns) == COLUMNS
    tokens = pd.read_parquet(sd_run / "tokens.parquet")
    shown = tokens[tokens["shown"]]
    assert shown["token"].tolist() == [1, 2, 3, 4, 5]  # the prompt's words, not <|startoftext|> or padding
    assert [t.replace("</w>", "") for t in shown["token_text"]] == tp.PROMPT.split()
    assert len(table) == 3 * 5 * tp.LATENT_SIZE ** 2
    assert sorted(table["source"].unique()) == ["folder:im0.png", "folder:im1.png", "folder:im2.png"]
    assert (table["value"] >= 0).all() and table["value"].notna().all()
    for image in ("0", "1", "2"):
        names = sorted(p.name for p in (sd_run / "overlays" / image).iterdir())
        assert names == ["001_a_w.png", "002_photo_w.png", "003_of_w.png", "004_a_w.png", "005_face_w.png"]
        with Image.open(sd_run / "overlays" / image / names[0]) as png:
            assert png.size == (tp.IMAGE_SIZE, tp.IMAGE_SIZE)
    meta = json.loads((sd_run / "meta.json").read_text())
    assert meta["family"] == "sd" and meta["timesteps"] == list(TIMESTEPS) and meta["images"] == 3
    assert meta["latent_grid"] == [tp.LATENT_SIZE, tp.LATENT_SIZE] and meta["latents_encoded"] == 3


def _oracle_sd(setup, tokens):
    """(3, T', 16, 16) float64: the heatmaps recomputed from materialised cross-attention maps."""
    pipe = setup["pipes"]["sd"]
    data = load_dataset(setup["images"], size=tp.IMAGE_SIZE)
    images = torch.stack([data[i]["image"] for i in range(3)])
    with torch.no_grad():
        x0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(tp.PROMPT, "cpu", 1, False)[0].expand(3, -1, -1)
    total, calls = 0, 0
    for t in TIMESTEPS:
        a = pipe.scheduler.alphas_cumprod[t].double()
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise_for(0, 0, [0, 1, 2], t, x0.shape[1:])).float()
        probs, _ = tm.probe(pipe.unet, lambda: pipe.unet(x_t, torch.tensor(t), encoder_hidden_states=embeds))
        for name, p in probs.items():
            if name.endswith("attn2"):  # cross-attention: keys are the prompt's tokens
                h = w = math.isqrt(p.shape[2])  # square latents: the block's token grid
                maps = p.sum(1).transpose(1, 2).reshape(3, -1, h, w)  # (B, T, h, w), heads summed
                total = total + F.interpolate(maps, size=(tp.LATENT_SIZE,) * 2, mode="bilinear", align_corners=False)
                calls += 1
    return (total / calls)[:, tokens]


def test_sd_heatmaps_equal_materialised_cross_attention_maps(setup, sd_run):
    table = pd.read_parquet(sd_run / "heatmaps.parquet")
    tokens = sorted(table["token"].unique())
    got = torch.tensor(table.sort_values(["image", "token", "row", "col"])["value"].to_numpy()).reshape(
        3, len(tokens), tp.LATENT_SIZE, tp.LATENT_SIZE)
    torch.testing.assert_close(got, _oracle_sd(setup, tokens), rtol=1e-4, atol=1e-5)


def test_flux_joint_attention_heatmaps(setup, tmp_path):
    """Packed latents, joint layers: each query's mass on the text is a share of its heads' attention."""
    out = tmp_path / "out"
    assert cli(_argv(setup, "flux", out, "--prompt", tp.PROMPT, "--max-sequence-length", str(tp.T5_LENGTH),
                     "--tokens", ",".join(map(str, range(tp.T5_LENGTH))))) == 0
    table = pd.read_parquet(out / "heatmaps.parquet")
    assert len(table) == 3 * tp.T5_LENGTH * tp.LATENT_SIZE ** 2
    per_query = table.groupby(["image", "row", "col"])["value"].sum()
    heads = 2  # every joint layer of the tiny Flux
    assert (per_query > 0).all() and (per_query < heads).all()  # image keys take the rest of the mass
    words = table[table["token"] < 5].groupby("token")["token_text"].first().str.replace("▁", "").tolist()
    assert words == tp.PROMPT.split()


def test_resumes_after_a_kill_without_redoing_finished_images(setup, sd_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save = command._save

    def killed_after_first_batch(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies after the first batch's images are finished

    monkeypatch.setattr(command, "_save", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        cli(_argv(setup, "sd", out, "--prompt", tp.PROMPT))
    assert not (out / "heatmaps.parquet").exists()
    monkeypatch.setattr(command, "_save", save)
    passes = []
    predict = Denoiser.predict
    monkeypatch.setattr(Denoiser, "predict", lambda self, x, t: passes.append(x.shape[0]) or predict(self, x, t))
    assert cli(_argv(setup, "sd", out, "--prompt", tp.PROMPT)) == 0
    assert passes == [1] * len(TIMESTEPS)  # image 2 only, once per timestep
    assert json.loads((out / "meta.json").read_text())["resumed"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / "heatmaps.parquet"),
                                  pd.read_parquet(sd_run / "heatmaps.parquet"))


def test_a_folder_of_other_options_is_refused(setup, sd_run, capsys):
    assert cli(_argv(setup, "sd", sd_run, "--prompt", "a face")) == 1
    assert "different configuration" in capsys.readouterr().err


def test_prompt_embeds_file(setup, sd_run, tmp_path):
    pipe = setup["pipes"]["sd"]
    with torch.no_grad():
        embeds = pipe.encode_prompt(tp.PROMPT, "cpu", 1, False)[0]
    save_file({"prompt_embeds": embeds.contiguous()}, tmp_path / "embeds.safetensors")
    out = tmp_path / "out"
    assert cli(_argv(setup, "sd", out, "--prompt-embeds", str(tmp_path / "embeds.safetensors"))) == 0
    table = pd.read_parquet(out / "heatmaps.parquet")
    assert sorted(table["token"].unique()) == list(range(tp.CLIP_LENGTH))  # no tokenizer: every token
    assert (table["token_text"] == "").all()
    assert len(list((out / "overlays" / "0").iterdir())) == tp.CLIP_LENGTH
    prompt_rows = pd.read_parquet(sd_run / "heatmaps.parquet")
    same = table.merge(prompt_rows, on=["image", "token", "row", "col"], suffixes=("", "_prompt"))
    np.testing.assert_allclose(same["value"], same["value_prompt"], rtol=1e-5, atol=1e-7)
