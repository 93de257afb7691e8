"""``diffcirc analyze`` end to end on tiny diffusers pipelines saved with save_pretrained, offline.

The clean losses of each run are recomputed from diffusers' own parts, sharing none of the
command's code: the pipeline object's ``encode_prompt``, its VAE's posterior mean, its scheduler's
``add_noise`` / ``get_velocity`` (flow matching: x_t = (1 - sigma) x0 + sigma eps in float64) and the
denoiser called as its pipeline calls it. Also: the tables' schema and sanity on an SD-like UNet
(self and cross attention), a Flux-like transformer (joint attention, packed latents), an SDXL-like
UNet (two CLIPs, pooled embeddings and time ids, v-prediction), an SD3-like transformer (CLIP + T5,
flow matching with shift 3, the default timestep grid) and a pixel DDPM with v-prediction; --prompt-embeds equals --prompt; a changed prompt or embeddings file is a
new configuration; resumption after a kill, with the latents read back, not encoded again;
refusals with exit 1. Runs that test only tables call the driver (no summary, no report).
"""

import json
import math
import shutil

import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import save_file

from diffcirc.analysis.config import noise_for
from diffcirc.analysis import driver
from diffcirc.cli import build_parser
from diffcirc.cli import main as cli
from diffcirc.cli.analyze import config_from_args
from diffcirc.data import load_dataset
from diffcirc.models.latents import LatentCache
from diffcirc.processor import Session
from helpers import tiny_pipelines as tp

N = 4  # images per dataset
T_ABLATE = 600
OPTIONS = ["--synthetic", str(N), "--natural", "lfw", "--natural-n", str(N), "--timesteps", str(T_ABLATE),
           "--ablation-timesteps", str(T_ABLATE), "--ablation-images", str(N), "--role-control-reps", "1",
           "--size", str(tp.IMAGE_SIZE), "--threads", "1"]
ENCODED = 2 * N + 3 * N  # both datasets, and the three control sets of as many images as the synthetic set
TABLES = ("layers", "aggregates", "histograms", "per_image", "image_histograms", "maps", "controls_per_image",
          "features_maps", "ablations", "attribution", "role_ablations", "circuit")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """The tiny SD, Flux, SDXL, SD3 and v-prediction pixel pipelines (objects and folders)."""
    root = tmp_path_factory.mktemp("analyze-pipelines")
    pipes = {"sd": tp.sd_pipeline(root / "sd"), "flux": tp.flux_pipeline(root / "flux"),
             "sdxl": tp.sdxl_pipeline(root / "sdxl"), "sd3": tp.sd3_pipeline(root / "sd3"),
             "pixel": tp.pixel_pipeline(root / "pixel", prediction_type="v_prediction")}
    return {"root": root, "pipes": pipes}


def _argv(model, out, *extra):
    return ["analyze", "--model", str(model), *OPTIONS, "--out", str(out), *extra]


def _run(setup, family, name, *extra):
    out = setup["root"] / name
    assert cli(_argv(setup["root"] / family, out, *extra)) == 0
    return out


def _tables_of(argv) -> None:
    """What ``diffcirc analyze ARGV`` computes, without the summary and report it writes after (the
    runs above test those): the driver on the configuration the command line parses to."""
    assert driver.run_analysis(config_from_args(build_parser().parse_args(argv))) is not None


@pytest.fixture(scope="module")
def sd_run(setup):
    return _run(setup, "sd", "out-sd", "--prompt", tp.PROMPT)


@pytest.fixture(scope="module")
def flux_run(setup):
    return _run(setup, "flux", "out-flux", "--prompt", tp.PROMPT, "--max-sequence-length", str(tp.T5_LENGTH))


def _natural_images() -> torch.Tensor:
    """The natural ablation images (N, 3, 32, 32), as the study loads them."""
    data = load_dataset("lfw", size=tp.IMAGE_SIZE, n=N, seed=0, split="heldout")
    return torch.stack([data[i]["image"] for i in range(N)]).float()


def _clean_losses(run) -> torch.Tensor:
    """(N,) float64 loss_clean of the natural images at T_ABLATE from the ablations table."""
    abl = pd.read_parquet(run / "ablations.parquet")
    rows = abl[(abl.dataset == "natural") & (abl.timestep == T_ABLATE)].groupby("image")["loss_clean"]
    assert (rows.nunique() == 1).all()  # one clean pass per image, shared by all its conditions
    return torch.tensor(rows.first().sort_index().to_numpy())


def _per_image_mse(prediction, target) -> torch.Tensor:
    return (prediction.double() - target.double()).square().flatten(1).mean(1)


def _noise(x0, t):
    return noise_for(0, 1, range(N), t, x0.shape[1:])  # seed 0, dataset 1 = natural


def _check_tables(run, session, kinds):
    for name in TABLES:
        assert (run / f"{name}.parquet").is_file(), name
    layers = pd.read_parquet(run / "layers.parquet")
    assert sorted(set(layers.kind)) == sorted(kinds)
    assert layers.n_keys.notna().all() and (layers.n_keys > 1).all()
    agg = pd.read_parquet(run / "aggregates.parquet")
    entropy = agg[agg.stat == "entropy"]
    assert set(entropy.model) == {"trained", "random"} and set(entropy.timestep) == {T_ABLATE}
    assert set(layers.layer) <= set(entropy.layer)
    # a head's mean entropy lies in [0, ln(keys it attends over)]
    bound = entropy.layer.str.replace(":text", "").map(layers.set_index("layer").n_keys.astype(float).map(math.log))
    assert (entropy["mean"] > 0).all() and (entropy["mean"] <= bound + 1e-4).all()
    # every head of every kind is ablated, in each mode, on each image
    abl = pd.read_parquet(run / "ablations.parquet")
    assert set(zip(abl.layer, abl["head"])) == set(session.heads())
    assert len(abl) == 2 * 2 * len(session.heads()) * N  # datasets x modes x heads x images
    assert (abl.loss_ablated != abl.loss_clean).any()
    assert set(zip(*pd.read_parquet(run / "attribution.parquet")[["layer", "head"]].to_numpy().T)) == \
        set(session.heads())
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["complexity_ratio"]["value"]) and summary["complexity_ratio"]["value"] > 0
    return json.loads((run / "meta.json").read_text())


def test_sd_pipeline_with_a_prompt(setup, sd_run):
    pipe = setup["pipes"]["sd"]
    meta = _check_tables(sd_run, Session(pipe.unet), ["cross", "self"])
    assert meta["family"] == "sd" and meta["image_size"] == tp.IMAGE_SIZE
    layers = pd.read_parquet(sd_run / "layers.parquet")
    assert (layers[layers.kind == "cross"].n_keys == tp.CLIP_LENGTH).all()  # the prompt's tokens are the keys
    # the latents were encoded once, both datasets and the control sets, into the run's folder
    assert len(list((sd_run / "latents").rglob("*.safetensors"))) == ENCODED
    # oracle: the pipeline's own prompt encoding, VAE and scheduler, the UNet called as the pipeline calls it
    with torch.no_grad():
        x0 = pipe.vae.encode(_natural_images()).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(tp.PROMPT, "cpu", 1, False)[0].expand(N, -1, -1)
        eps = _noise(x0, T_ABLATE)
        x_t = pipe.scheduler.add_noise(x0, eps, torch.tensor([T_ABLATE]))
        eps_hat = pipe.unet(x_t, T_ABLATE, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(_clean_losses(sd_run), _per_image_mse(eps_hat, eps), rtol=1e-4, atol=0)


def test_flux_pipeline_flow_matching(setup, flux_run):
    pipe = setup["pipes"]["flux"]
    meta = _check_tables(flux_run, Session(pipe.transformer), ["joint"])
    assert meta["family"] == "flux"
    assert meta["noise"] == [{"timestep": T_ABLATE, "sigma": T_ABLATE / 1000}]
    side = tp.LATENT_SIZE // 2  # packed 2x2: 8x8 image tokens
    layers = pd.read_parquet(flux_run / "layers.parquet")
    assert (layers.n_keys == side * side + tp.T5_LENGTH).all()
    agg = pd.read_parquet(flux_run / "aggregates.parquet")
    assert {name + ":text" for name in layers.layer} <= set(agg.layer)  # text queries of joint layers
    # image queries over image keys: label mass has its uniform-attention baseline on joint layers too
    assert set(agg[agg.stat == "label_mass_uniform"].layer) == set(layers.layer)
    # oracle: FluxPipeline's own encode_prompt, packing, position ids and unpacking; the target ε − x0
    sigma = T_ABLATE / 1000
    with torch.no_grad():
        config = pipe.vae.config
        x0 = (pipe.vae.encode(_natural_images()).latent_dist.mean - config.shift_factor) * config.scaling_factor
        embeds, pooled, text_ids = pipe.encode_prompt(tp.PROMPT, None, device="cpu", max_sequence_length=tp.T5_LENGTH)
        eps = _noise(x0, T_ABLATE)
        x_t = ((1 - sigma) * x0.double() + sigma * eps.double()).float()
        c = x0.shape[1]
        out = pipe.transformer(
            hidden_states=FluxPipeline._pack_latents(x_t, N, c, tp.LATENT_SIZE, tp.LATENT_SIZE),
            timestep=torch.full((N,), sigma), guidance=torch.full((N,), 3.5), pooled_projections=pooled.expand(N, -1),
            encoder_hidden_states=embeds.expand(N, -1, -1), txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(N, side, side, "cpu", torch.float32)).sample
        velocity = FluxPipeline._unpack_latents(out, tp.IMAGE_SIZE, tp.IMAGE_SIZE, pipe.vae_scale_factor)
    torch.testing.assert_close(_clean_losses(flux_run), _per_image_mse(velocity, eps - x0), rtol=1e-4, atol=0)


def test_pixel_pipeline_with_v_prediction(setup):
    """The CelebA-HQ layout (model_index.json, unet/, scheduler/): pixels, no prompt, no VAE; the
    loss is on the velocity target of the scheduler's own get_velocity."""
    pipe = setup["pipes"]["pixel"]
    run = setup["root"] / "out-pixel"
    _tables_of(_argv(setup["root"] / "pixel", run, "--ablation-modes", "zero", "--no-random-control"))
    layers = pd.read_parquet(run / "layers.parquet")
    assert set(layers.kind) == {"self"} and not (run / "latents").exists()
    assert json.loads((run / "meta.json").read_text())["family"] == "pixel"
    with torch.no_grad():
        x0 = _natural_images()
        eps = _noise(x0, T_ABLATE)
        t = torch.tensor([T_ABLATE])
        v_hat = pipe.unet(pipe.scheduler.add_noise(x0, eps, t), T_ABLATE).sample
        v = pipe.scheduler.get_velocity(x0, eps, t)
    torch.testing.assert_close(_clean_losses(run), _per_image_mse(v_hat, v), rtol=1e-4, atol=0)


def _check_every_head_ablated(run, model, kinds) -> dict:
    """The driver's tables of a run with zero ablations only: layer kinds, every head of every kind
    ablated on each image of both datasets; returns meta.json."""
    layers = pd.read_parquet(run / "layers.parquet")
    assert sorted(set(layers.kind)) == sorted(kinds)
    heads = Session(model).heads()
    abl = pd.read_parquet(run / "ablations.parquet")
    assert set(zip(abl.layer, abl["head"])) == set(heads) and len(abl) == 2 * len(heads) * N
    return json.loads((run / "meta.json").read_text())


def test_sdxl_pipeline_with_pooled_embeddings_and_time_ids(setup):
    pipe = setup["pipes"]["sdxl"]
    run = setup["root"] / "out-sdxl"
    _tables_of(_argv(setup["root"] / "sdxl", run, "--prompt", tp.PROMPT, "--ablation-modes", "zero",
                     "--no-random-control"))
    assert _check_every_head_ablated(run, pipe.unet, ["cross", "self"])["family"] == "sdxl"
    # oracle: SDXL's own encode_prompt and time ids; diffusers' DDPM noising and velocity on the
    # Euler scheduler's training schedule (its sampler rescales the same x_t)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        x0 = pipe.vae.encode(_natural_images()).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(tp.PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size = (tp.IMAGE_SIZE, tp.IMAGE_SIZE)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        eps, t = _noise(x0, T_ABLATE), torch.tensor([T_ABLATE])
        v_hat = pipe.unet(ddpm.add_noise(x0, eps, t), T_ABLATE, encoder_hidden_states=embeds.expand(N, -1, -1),
                          added_cond_kwargs={"text_embeds": pooled.expand(N, -1),
                                             "time_ids": time_ids.expand(N, -1)}).sample
    torch.testing.assert_close(_clean_losses(run), _per_image_mse(v_hat, ddpm.get_velocity(x0, eps, t)),
                               rtol=1e-4, atol=0)


def test_sd3_pipeline_flow_matching_on_its_default_grid(setup):
    """No --timesteps: the trace runs at 10 quantiles of the shifted sigma grid SD3 trains on."""
    pipe = setup["pipes"]["sd3"]
    run = setup["root"] / "out-sd3"
    argv = _argv(setup["root"] / "sd3", run, "--prompt", tp.PROMPT, "--max-sequence-length", str(tp.T5_LENGTH),
                 "--ablation-modes", "zero", "--no-random-control")
    at = argv.index("--timesteps")
    _tables_of(argv[:at] + argv[at + 2:])
    meta = _check_every_head_ablated(run, pipe.transformer, ["joint"])
    # the scheduler as saved: its 1000 training timesteps sigma * 1000, shift 3 applied, taken at the
    # centres of 10 equal bins of their ranks from low noise to high
    grid = sorted(FlowMatchEulerDiscreteScheduler.from_pretrained(setup["root"] / "sd3" / "scheduler")
                  .timesteps.tolist())
    expected = [round(grid[int((i + 0.5) * len(grid) / 10)]) for i in range(10)]
    assert meta["timesteps"] == expected and sum(t > 500 for t in expected) >= 7  # shift 3: mostly noisy
    assert meta["ablation_timesteps"] == [T_ABLATE]
    agg = pd.read_parquet(run / "aggregates.parquet")
    assert set(agg[agg.stat == "entropy"].timestep) == set(expected)
    # oracle: SD3's own encode_prompt, the VAE's shift and scale, the transformer called with sigma * 1000
    sigma = T_ABLATE / 1000
    with torch.no_grad():
        config = pipe.vae.config
        x0 = (pipe.vae.encode(_natural_images()).latent_dist.mean - config.shift_factor) * config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(tp.PROMPT, None, None, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, max_sequence_length=tp.T5_LENGTH)
        eps = _noise(x0, T_ABLATE)
        x_t = ((1 - sigma) * x0.double() + sigma * eps.double()).float()
        velocity = pipe.transformer(hidden_states=x_t, timestep=torch.full((N,), float(T_ABLATE)),
                                    encoder_hidden_states=embeds.expand(N, -1, -1),
                                    pooled_projections=pooled.expand(N, -1)).sample
    torch.testing.assert_close(_clean_losses(run), _per_image_mse(velocity, eps - x0), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def embeds_setup(setup):
    """The SD pipeline without text encoder and tokenizer on disk, and a file of the embeddings
    the pipeline's own encode_prompt gives the prompt."""
    root = setup["root"]
    folder = shutil.copytree(root / "sd", root / "sd-no-text")
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with torch.no_grad():
        embeds = setup["pipes"]["sd"].encode_prompt(tp.PROMPT, "cpu", 1, False)[0]
    path = root / "embeds.safetensors"
    save_file({"prompt_embeds": embeds.contiguous()}, str(path))
    return {"folder": folder, "file": path, "embeds": embeds}


def _embeds_argv(embeds_setup, out):
    return _argv(embeds_setup["folder"], out, "--prompt-embeds", str(embeds_setup["file"]))


@pytest.fixture(scope="module")
def embeds_run(setup, embeds_setup):
    """The tables of the SD pipeline without its text encoder, on the embeddings file."""
    out = setup["root"] / "out-embeds"
    _tables_of(_embeds_argv(embeds_setup, out))
    return out


def test_prompt_embeds_give_the_results_of_the_prompt(sd_run, embeds_run):
    for name in ("aggregates", "ablations", "attribution"):
        pd.testing.assert_frame_equal(pd.read_parquet(embeds_run / f"{name}.parquet"),
                                      pd.read_parquet(sd_run / f"{name}.parquet"), rtol=1e-5, obj=name)


def _tables(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_a_changed_prompt_or_embeddings_file_is_a_new_configuration(setup, sd_run, embeds_setup, embeds_run, capsys):
    before = _tables(sd_run), _tables(embeds_run)
    assert cli(_argv(setup["root"] / "sd", sd_run, "--prompt", "a photo of a smiling face")) == 1
    assert "holds results of a different configuration" in capsys.readouterr().err
    # the same file name holding other embeddings: not the run that folder holds either
    file = embeds_setup["file"]
    original = file.read_bytes()
    try:
        save_file({"prompt_embeds": (2 * embeds_setup["embeds"]).contiguous()}, str(file))
        assert cli(_embeds_argv(embeds_setup, embeds_run)) == 1
    finally:
        file.write_bytes(original)  # the module's other tests read it
    assert "holds results of a different configuration" in capsys.readouterr().err
    assert (_tables(sd_run), _tables(embeds_run)) == before


def test_killed_run_resumes_to_identical_results(setup, sd_run, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    args = _argv(setup["root"] / "sd", out, "--prompt", tp.PROMPT)

    def killed(exp):
        raise KeyboardInterrupt  # the process dies in the ablations, after trace and features

    with monkeypatch.context() as patched:
        patched.setattr(driver, "PHASES", tuple(p._replace(run=killed) if p.unit == "ablations" else p
                                                for p in driver.PHASES))
        with pytest.raises(KeyboardInterrupt):
            _tables_of(args)
    assert set(json.loads((out / "manifest.json").read_text())["units"]) == {"trace", "controls", "features"}
    assert len(list((out / "latents").rglob("*.safetensors"))) == ENCODED
    encoded = []
    encode = LatentCache.latents
    monkeypatch.setattr(LatentCache, "latents", lambda self, *a: (encoded.append(self), encode(self, *a))[1])
    kept = {name: (out / name).stat().st_mtime_ns for name in ("aggregates.parquet", "features_maps.parquet")}
    _tables_of(args)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not computed twice
    assert encoded and all(cache.encoded == 0 for cache in encoded)  # every latent read back, none encoded again
    for name in ("aggregates", "per_image", "controls_per_image", "ablations", "attribution", "role_ablations",
                 "circuit"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"),
                                      pd.read_parquet(sd_run / f"{name}.parquet"), rtol=1e-6, obj=name)


def _refused(argv, capsys) -> str:
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc analyze: error:") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_folder_without_a_usable_denoiser_is_refused(setup, tmp_path, capsys):
    folder = shutil.copytree(setup["root"] / "sd", tmp_path / "broken")
    (folder / "unet" / "config.json").unlink()
    err = _refused(_argv(folder, tmp_path / "out", "--prompt", tp.PROMPT), capsys)
    assert "holds no usable denoiser (unet/ has no config.json)" in err, err
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.parametrize("family, extra, message", [
    ("pixel", ["--prompt", tp.PROMPT], "unconditional UNet2DModel: it takes no prompt"),
    ("sd", ["--size", "30"], "--size 30 does not fit this sd model: it must be a multiple of 4"),
    ("short-schedule", [], "--timesteps: timestep 600 is not an integer in [0, 500)"),
])
def test_options_that_do_not_fit_the_model_are_refused(setup, tmp_path, capsys, family, extra, message):
    folder = setup["root"] / family
    if family == "short-schedule":  # a DDPM trained on 500 steps has no timestep 600
        folder = shutil.copytree(setup["root"] / "pixel", tmp_path / "short")
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 500}))
    err = _refused(_argv(folder, tmp_path / "out", *extra), capsys)
    assert message in err, err


def test_dtype_sets_the_denoiser_and_text_encoders_while_losses_stay_float32(setup, tmp_path):
    from diffcirc.analysis.phases import Experiment

    def experiment(dtype):
        argv = _argv(setup["root"] / "flux", tmp_path / dtype, "--prompt", tp.PROMPT, "--max-sequence-length",
                     str(tp.T5_LENGTH), "--dtype", dtype)
        return Experiment(config_from_args(build_parser().parse_args(argv)))

    half, full = experiment("bfloat16"), experiment("float32")
    assert half.unet.dtype == torch.bfloat16 and full.unet.dtype == torch.float32
    assert {e.dtype for e in half.pipe.text_encoders.values()} == {torch.bfloat16}
    assert half.pipe.vae.dtype == torch.float32  # it only encodes, and half precision overflows in some VAEs
    d = half.data["natural"]
    x_t, target = half.noisy(d, d.ids, d.x0, T_ABLATE)
    with torch.no_grad():
        got, expected = half.forward(half.unet, x_t, T_ABLATE), full.forward(full.unet, x_t, T_ABLATE)
    assert got.dtype == torch.float32 and x_t.dtype == target.dtype == torch.float32
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1 * float(expected.abs().max()))
