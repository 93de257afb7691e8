"""Tiny random diffusers pipelines, built from their parts and saved with ``save_pretrained``.

Each builder returns the diffusers pipeline object (its own ``encode_prompt`` is the oracle of the
conditioning tests) and saves it to a folder. Nothing is downloaded: the CLIP tokenizers' vocab
and merges are written here, and the T5 tokenizer is a unigram ``tokenizers`` model built from a
word list (no sentencepiece file).

Sizes: 32x32 images, a VAE of two blocks (scale factor 2: 16x16 latents, 4 channels).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, PNDMScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

IMAGE_SIZE = 32
LATENT_SIZE = 16
LATENT_CHANNELS = 4
CLIP_LENGTH = 8  # the CLIP tokenizers' model_max_length
T5_LENGTH = 12  # max_sequence_length the tests pass to SD3 and Flux
PROMPT = "a photo of a face"
WORDS = ("a", "photo", "of", "face", "smiling", "person")
_BPE_MERGES = ("p h", "ph o", "pho t", "phot o</w>", "o f</w>", "f a", "fa c", "fac e</w>")


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters and a few merges, written as vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    for merge in _BPE_MERGES:
        vocab["".join(merge.split())] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_BPE_MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    return CLIPTokenizer.from_pretrained(folder)


def t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A unigram tokenizer with T5's special tokens, whole words and single letters (▁-prefixed)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in string.ascii_lowercase]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def clip_encoder(hidden: int, projection: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(d_model: int, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def vae(shift_factor: float | None = None, scaling_factor: float = 0.5, seed: int = 0) -> AutoencoderKL:
    """Two encoder blocks (scale factor 2); SD3/Flux-style configs set shift_factor and drop the quant convs."""
    torch.manual_seed(seed)
    flow = shift_factor is not None
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=not flow, use_post_quant_conv=not flow).eval()


def _scratch(folder: Path, name: str) -> Path:
    """Where a part is written before the pipeline saves it: beside the pipeline folder, not in it."""
    return folder.parent / f"{folder.name}-parts" / name


def _sharpen(model: torch.nn.Module, gain: float = 3.0) -> torch.nn.Module:
    """Peaks random attention (it is nearly uniform otherwise): scales the query projections."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("to_q.weight", "add_q_proj.weight")):
                p.mul_(gain)
    return model.eval()


def sd_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x layout: CLIPTextModel (16 channels), a cross-attention UNet, PNDM (scaled_linear betas)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_encoder(16),
                                   tokenizer=clip_tokenizer(_scratch(folder, "tok")), unet=_sharpen(unet),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def sdxl_pipeline(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout: CLIP-L (16) and CLIP-G with projection (24, pooled 12), a UNet with "text_time"
    added conditions (6 time ids x 4 + 12 = 36), Euler with v-prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=40, attention_head_dim=4,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=36)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction")
    pipe = StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025), text_encoder=clip_encoder(16),
        tokenizer=clip_tokenizer(_scratch(folder, "tok")),
        text_encoder_2=clip_encoder(24, projection=12, seed=1),
        tokenizer_2=clip_tokenizer(_scratch(folder, "tok2"), pad_token="!"), unet=_sharpen(unet), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def sd3_pipeline(folder: Path, seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """SD3 layout: CLIP-L (16, pooled 8) + CLIP-G (24, pooled 12) + T5 (48 channels), a two-block MMDiT
    (joint width 48, pooled 20), flow matching with shift 3."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
        pooled_projection_dim=20, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=_sharpen(transformer), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.06, scaling_factor=1.5), text_encoder=clip_encoder(16, projection=8),
        tokenizer=clip_tokenizer(_scratch(folder, "tok")), text_encoder_2=clip_encoder(24, projection=12, seed=1),
        tokenizer_2=clip_tokenizer(_scratch(folder, "tok2"), pad_token="!"),
        text_encoder_3=t5_encoder(48) if with_t5 else None,
        tokenizer_3=t5_tokenizer(_scratch(folder, "tok3")) if with_t5 else None)
    pipe.save_pretrained(folder)
    return pipe


def flux_pipeline(folder: Path, seed: int = 0, guidance: bool = True) -> FluxPipeline:
    """Flux layout: CLIP (16, pooled) + T5 (32), one double- and one single-stream block over packed
    latents (4 x 4 = 16 channels), guidance embedding, flow matching with dynamic shifting."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae(shift_factor=0.1, scaling_factor=0.4),
                        text_encoder=clip_encoder(16), tokenizer=clip_tokenizer(_scratch(folder, "tok")),
                        text_encoder_2=t5_encoder(32), tokenizer_2=t5_tokenizer(_scratch(folder, "tok2")),
                        transformer=_sharpen(transformer))
    pipe.save_pretrained(folder)
    return pipe


def pixel_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> DDPMPipeline:
    """A pixel DDPM in the CelebA-HQ layout (model_index.json, unet/, scheduler/): one attention level."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    pipe = DDPMPipeline(unet=_sharpen(unet), scheduler=DDPMScheduler(prediction_type=prediction_type))
    pipe.save_pretrained(folder)
    return pipe


BUILDERS = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline,
            "pixel": pixel_pipeline}
