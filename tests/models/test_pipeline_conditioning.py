"""Prompt conditioning and the denoiser call against diffusers' own pipelines.

Tiny random pipelines (tests/helpers/tiny_pipelines.py) are saved with save_pretrained and read
back through ``load_pipeline``. Oracles: each pipeline object's ``encode_prompt`` for the
embeddings, and the denoiser's own inputs and output captured while the pipeline runs one
sampling step (no classifier-free guidance), which ``Denoiser.predict`` must reproduce from the
unpacked latents and the timestep alone.
"""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from diffcirc.models import ModelLoadError
from diffcirc.models.denoiser import latent_image_ids, pack_latents, unpack_latents
from diffcirc.models.pipeline import load_pipeline
from helpers import tiny_pipelines as tp

TEXT = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def built(tmp_path_factory, single_thread):
    """{family: (diffusers pipeline object, our Pipeline loaded from its folder)}."""
    out = {}
    for family in TEXT:
        folder = tmp_path_factory.mktemp(family) / "pipe"
        pipe = tp.BUILDERS[family](folder)
        out[family] = (pipe, load_pipeline(str(folder)))
    return out


def _their_embeds(family, pipe):
    """(prompt_embeds, pooled or None) from the pipeline's own encode_prompt, without guidance."""
    with torch.no_grad():
        if family == "sd":
            return pipe.encode_prompt(tp.PROMPT, "cpu", 1, False)[0], None
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(tp.PROMPT, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds, pooled
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(tp.PROMPT, None, None, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=tp.T5_LENGTH)
            return embeds, pooled
        embeds, pooled, _ = pipe.encode_prompt(tp.PROMPT, None, device="cpu", num_images_per_prompt=1,
                                               max_sequence_length=tp.T5_LENGTH)
        return embeds, pooled


@pytest.mark.parametrize("family", TEXT)
def test_prompt_embeddings_equal_the_pipelines_encode_prompt(built, family):
    pipe, ours = built[family]
    conditioning = ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH)
    embeds, pooled = _their_embeds(family, pipe)
    torch.testing.assert_close(conditioning.prompt_embeds, embeds, rtol=0, atol=1e-6)
    if pooled is None:
        assert conditioning.pooled_prompt_embeds is None
    else:
        torch.testing.assert_close(conditioning.pooled_prompt_embeds, pooled, rtol=0, atol=1e-6)
    assert len(conditioning.tokens) == conditioning.n_tokens == embeds.shape[1]


@pytest.mark.parametrize("family", TEXT)
def test_the_prompts_own_tokens_are_its_words(built, family):
    _, ours = built[family]
    c = ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH)
    words = [c.tokens[i].replace("</w>", "").replace("▁", "") for i in c.shown_tokens()]
    per_encoder = tp.PROMPT.split()
    assert words == per_encoder * (2 if family == "sd3" else 1)  # SD3: the CLIP part, then the T5 part


def test_sd3_without_t5_pads_with_the_pipelines_zeros(tmp_path, single_thread):
    pipe = tp.sd3_pipeline(tmp_path / "pipe", with_t5=False)
    ours = load_pipeline(str(tmp_path / "pipe"))
    assert "text_encoder_3" not in ours.text_encoders
    conditioning = ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH)
    embeds, pooled = _their_embeds("sd3", pipe)
    torch.testing.assert_close(conditioning.prompt_embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(conditioning.pooled_prompt_embeds, pooled, rtol=0, atol=1e-6)
    assert conditioning.prompt_embeds[0, tp.CLIP_LENGTH:].abs().max() == 0


def _one_step(family, pipe):
    """The denoiser's call in one sampling step of the pipeline: (latents (B, C, H, W) it was
    given, timestep in scheduler units, its output as (B, C, H, W))."""
    model = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        seen["t"] = args[1] if len(args) > 1 else kwargs["timestep"]
        seen["out"] = output[0]

    handle = model.register_forward_hook(hook, with_kwargs=True)
    extra = {"max_sequence_length": tp.T5_LENGTH} if family in ("sd3", "flux") else {}
    # guidance_scale 1: no classifier-free guidance; Flux runs none anyway and feeds 3.5 to its guidance embedding
    extra["guidance_scale"] = 3.5 if family == "flux" else 1.0
    try:
        with torch.no_grad():
            pipe(tp.PROMPT, height=tp.IMAGE_SIZE, width=tp.IMAGE_SIZE, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **extra)
    finally:
        handle.remove()
    x, t, out = seen["x"], seen["t"].reshape(-1)[0].item(), seen["out"]
    if family == "flux":  # packed tokens, timestep / 1000
        x = FluxPipeline._unpack_latents(x, tp.IMAGE_SIZE, tp.IMAGE_SIZE, pipe.vae_scale_factor)
        out = FluxPipeline._unpack_latents(out, tp.IMAGE_SIZE, tp.IMAGE_SIZE, pipe.vae_scale_factor)
        t = t * 1000
    return x, t, out


@pytest.mark.parametrize("family", TEXT)
def test_predict_reproduces_the_denoiser_call_inside_the_pipeline(built, family):
    """Conditioning, SDXL's time ids, SD3's pooled projections, Flux's packing, ids, timestep scale
    and guidance embedding: predict(x_t, t) gives what the model gave inside the pipeline."""
    pipe, ours = built[family]
    x, t, expected = _one_step(family, pipe)
    denoiser = ours.denoiser(ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH))
    got = denoiser.predict(x, t)
    assert got.shape == x.shape == (1, tp.LATENT_CHANNELS, tp.LATENT_SIZE, tp.LATENT_SIZE)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_flux_packing_and_ids_are_the_pipelines():
    latents = torch.randn(2, 4, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), latents, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8),
                               rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu",
                                                                                               torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 5, 6))


def test_flux_without_guidance_embedding_takes_no_guidance(tmp_path, single_thread):
    pipe = tp.flux_pipeline(tmp_path / "pipe", guidance=False)
    ours = load_pipeline(str(tmp_path / "pipe"))
    x, t, expected = _one_step("flux", pipe)
    got = ours.denoiser(ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH)).predict(x, t)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


# ---- --prompt-embeds files ------------------------------------------------------------------------

@pytest.mark.parametrize("family", TEXT)
def test_prompt_embeds_file_gives_the_same_prediction_as_the_prompt(built, family, tmp_path):
    _, ours = built[family]
    c = ours.encode(tp.PROMPT, max_sequence_length=tp.T5_LENGTH)
    tensors = {"prompt_embeds": c.prompt_embeds}
    if c.pooled_prompt_embeds is not None:
        tensors["pooled_prompt_embeds"] = c.pooled_prompt_embeds
    save_file(tensors, tmp_path / "embeds.safetensors")
    read = ours.read_embeds(str(tmp_path / "embeds.safetensors"))
    assert read.tokens is None and read.shown_tokens() == list(range(c.n_tokens))
    x = torch.randn(2, tp.LATENT_CHANNELS, tp.LATENT_SIZE, tp.LATENT_SIZE)
    t = ours.noising.default_timesteps(1, image_tokens=64)[0]
    torch.testing.assert_close(ours.denoiser(read).predict(x, t), ours.denoiser(c).predict(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("family, tensors, named", [
    ("sd", {"pooled_prompt_embeds": torch.zeros(1, 12)}, "'prompt_embeds'"),
    ("sd", {"prompt_embeds": torch.zeros(1, 8, 15)}, r"prompt_embeds.*\(1, L, 16\)"),
    ("sd", {"prompt_embeds": torch.zeros(8, 16)}, r"prompt_embeds.*\(1, L, 16\)"),
    ("sdxl", {"prompt_embeds": torch.zeros(1, 8, 40)}, "'pooled_prompt_embeds'"),
    ("sdxl", {"prompt_embeds": torch.zeros(1, 8, 40), "pooled_prompt_embeds": torch.zeros(1, 11)},
     r"pooled_prompt_embeds.*\(1, 12\)"),
    ("sd3", {"prompt_embeds": torch.zeros(1, 20, 48), "pooled_prompt_embeds": torch.zeros(2, 20)},
     r"pooled_prompt_embeds.*\(1, 20\)"),
    ("flux", {"prompt_embeds": torch.zeros(1, 12, 16), "pooled_prompt_embeds": torch.zeros(1, 16)},
     r"prompt_embeds.*\(1, L, 32\)"),
])
def test_a_missing_or_misshaped_tensor_is_named(built, family, tensors, named, tmp_path):
    _, ours = built[family]
    path = tmp_path / "embeds.safetensors"
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match=named):
        ours.read_embeds(str(path))


def test_a_pipeline_without_text_encoders_asks_for_prompt_embeds(built):
    _, ours = built["sd"]
    bare = load_pipeline(ours.folder.root, text=False)
    assert bare.text_encoders == {} and bare.tokenizers == {}
    with pytest.raises(ModelLoadError, match="--prompt-embeds"):
        bare.encode(tp.PROMPT)
