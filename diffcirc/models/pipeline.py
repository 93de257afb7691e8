"""A model as the study uses it: a denoiser, its scheduler's noising and, when the pipeline has
them, a VAE and text encoders (``load_pipeline``).

    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # a hub id in the local cache
    conditioning = pipe.encode("a photo of a face")                        # once
    denoiser = pipe.denoiser(conditioning)
    x_t = pipe.noising.add_noise(latents, eps, t); denoiser.predict(x_t, t)

Every weights file is read through the checks of ``load.py`` (diffusers components) and
``text_encoders.py`` (transformers ones): safetensors only, nothing left unread, nothing
non-finite. ``"bundled"`` and pixel folders without model_index.json (``unet/`` + ``scheduler/``,
or a bare UNet folder) load through ``load``; everything else by its ``model_index.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .conditioning import encode_prompt, read_prompt_embeds
from .denoiser import FLUX_GUIDANCE, Conditioning, Denoiser, denoiser_family
from .load import BUNDLED, ModelLoadError, load, load_component, read_scheduler
from .noising import noising_for
from .pipeline_files import MODEL_INDEX, PipelineFolder, find_components, resolve_model_path
from .text_encoders import load_text_encoder, load_tokenizer

DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
VAE_CLASSES = ("AutoencoderKL",)
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latents of 128 (1024 pixels); the config has none
LATENT_FALLBACK_SCALE = 8  # the pipelines' vae_scale_factor when the folder has no VAE


@dataclass
class Pipeline:
    """A loaded model. family: see ``denoiser.FAMILIES``; folder: the component folders (None for
    a model loaded through ``load``); text_encoders / tokenizers: {component name: object}."""

    name: str
    family: str
    model: torch.nn.Module
    scheduler: object
    folder: Optional[PipelineFolder] = None
    vae: Optional[torch.nn.Module] = None
    text_encoders: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)

    def __post_init__(self):
        self.noising = noising_for(self.scheduler)

    @property
    def is_latent(self) -> bool:
        return self.family != "pixel"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent: 2 ** (number of VAE blocks - 1), as the pipelines compute it; 1 for pixel models."""
        if not self.is_latent:
            return 1
        if self.vae is None:
            return LATENT_FALLBACK_SCALE
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The model's default resolution in pixels: the denoiser's sample size times the VAE's scale."""
        sample = self.model.config.get("sample_size") or (FLUX_DEFAULT_SAMPLE_SIZE if self.family == "flux" else None)
        if sample is None:
            raise ModelLoadError(f"the denoiser of {self.name!r} names no sample_size in its config.json; pass --size")
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor

    def size_step(self) -> int:
        """The multiple of which every image size (pixels) must be: pixels per latent times the
        denoiser's down-sampling (UNets: 2 per level after the first) or patching (SD3's patch
        size, Flux's 2x2 packing)."""
        config = self.model.config
        if self.family == "sd3":
            per_latent = int(config.patch_size)
        elif self.family == "flux":
            per_latent = 2
        else:
            per_latent = 2 ** (len(config.block_out_channels) - 1)
        return self.vae_scale_factor * per_latent

    def check_size(self, size: int) -> int:
        """size, if the VAE and the denoiser take images of that size; else ``ModelLoadError``."""
        step = self.size_step()
        if size % step:
            raise ModelLoadError(f"--size {size} does not fit this {self.family} model: it must be a multiple of "
                                 f"{step} ({self.vae_scale_factor} pixels per latent times "
                                 f"{step // self.vae_scale_factor}, the denoiser's down-sampling or patching)")
        return size

    def image_tokens(self, size: int) -> Optional[int]:
        """Tokens of one size x size image in a transformer's sequence (SD3: patches of its patch
        size; Flux: latents packed 2x2), as the flow pipelines count them for their dynamic shift;
        None for UNets, whose schedulers do not shift by it."""
        if self.family == "sd3":
            return (size // self.vae_scale_factor // int(self.model.config.patch_size)) ** 2
        if self.family == "flux":
            return (size // self.vae_scale_factor // 2) ** 2
        return None

    def default_timesteps(self, n: int, size: int) -> list[int]:
        """n timesteps at evenly spaced quantiles of the ones the model was trained on at this image
        size (``noising.default_timesteps``): 50, 150, ..., 950 for n = 10 on a DDPM schedule."""
        return self.noising.default_timesteps(n, image_tokens=self.image_tokens(size))

    def latent_channels(self) -> int:
        """Channels of the denoiser's (unpacked) input."""
        c = self.model.config
        return int(c.in_channels) // 4 if self.family == "flux" else int(c.in_channels)

    def encode(self, prompt: str = "", max_sequence_length: Optional[int] = None) -> Optional[Conditioning]:
        """The conditioning of ``prompt`` by the pipeline's own text encoders (None for a pixel model)."""
        return encode_prompt(self.model, self.tokenizers, self.text_encoders, prompt, max_sequence_length)

    def read_embeds(self, path: str) -> Conditioning:
        """The conditioning in a ``--prompt-embeds`` safetensors file, checked against the denoiser."""
        return read_prompt_embeds(path, self.model)

    def denoiser(self, conditioning: Optional[Conditioning], guidance: float = FLUX_GUIDANCE) -> Denoiser:
        return Denoiser(self.model, conditioning, vae_scale_factor=self.vae_scale_factor, guidance=guidance)


def _moved(module: torch.nn.Module, device=None, dtype=None) -> torch.nn.Module:
    """module on device / in dtype, moved only when it is not there already (a no-op ``to`` still
    makes diffusers warn about casting)."""
    param = next(module.parameters())
    if (device is not None and torch.device(device) != param.device) or (dtype is not None and dtype != param.dtype):
        module = module.to(device=device, dtype=dtype)
    return module


def _uses_load(path: str) -> bool:
    """Whether a folder is a pixel model ``load`` reads: no model_index.json and no transformer/."""
    return not os.path.isfile(os.path.join(path, MODEL_INDEX)) and not os.path.isdir(os.path.join(path, "transformer"))


def load_pipeline(name: str = "bundled", device=None, dtype=None, text: bool = True,
                  cache_dir: Optional[str] = None) -> Pipeline:
    """The model ``name`` names: "bundled", a pipeline or UNet folder, or a hub id in the local cache.

    device / dtype: where the denoiser and text encoders go (the VAE stays float32: it only
    encodes, and half precision overflows in some, e.g. SDXL's). text: load the text encoders and
    tokenizers (not needed with embeddings from a file). Raises FileNotFoundError and
    ``ModelLoadError`` as ``load`` does, and ``ModelLoadError`` for a folder without a usable
    denoiser, naming what is missing.
    """
    if name == "bundled" or (os.path.isdir(name) and _uses_load(name)):
        unet, scheduler = load(name, device=device, dtype=dtype)
        return Pipeline(name, denoiser_family(unet), unet, scheduler)
    root = resolve_model_path(name, cache_dir)
    if _uses_load(root) and os.path.realpath(root) != os.path.realpath(BUNDLED):
        unet, scheduler = load(root, device=device, dtype=dtype)
        return Pipeline(name, denoiser_family(unet), unet, scheduler)
    parts = find_components(root)
    model = _moved(load_component(parts.denoiser, DENOISER_CLASSES, "the denoiser"), device, dtype)
    family = denoiser_family(model)
    scheduler = read_scheduler(parts.scheduler)
    vae = None
    if parts.vae is not None:
        vae = _moved(load_component(parts.vae, VAE_CLASSES, "the VAE"), device, torch.float32)
    encoders, tokenizers = {}, {}
    if text and family != "pixel":
        for component, folder in parts.text_encoders.items():
            encoders[component] = _moved(load_text_encoder(folder, parts.classes.get(component),
                                                           dtype=dtype or torch.float32), device)
        for component, folder in parts.tokenizers.items():
            tokenizers[component] = load_tokenizer(folder, parts.classes.get(component))
    return Pipeline(name, family, model, scheduler, parts, vae, encoders, tokenizers)
