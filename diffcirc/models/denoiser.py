"""One call for every denoiser: ``Denoiser(model, conditioning).predict(x_t, t)``.

The model's families, by class and config (``denoiser_family``):

    pixel   UNet2DModel                    model(x_t, t)
    sd      UNet2DConditionModel           model(x_t, t, encoder_hidden_states)            SD 1.x / 2.x
    sdxl    UNet2DConditionModel with      ... added_cond_kwargs={text_embeds: pooled,     SDXL
            addition_embed_type "text_time"     time_ids: (H, W, 0, 0, H, W) in pixels}
    sd3     SD3Transformer2DModel          model(x_t, encoder_hidden_states, pooled_projections, t)
    flux    FluxTransformer2DModel         packed latents, img_ids / txt_ids, t / 1000, guidance

Each is called as its diffusers pipeline calls it, with the prompt conditioning bound once and
repeated over the batch (no classifier-free guidance: one conditional pass). Latents go in and
the prediction comes out as (B, C, H, W) float32, whatever the model's own layout: Flux's 2x2
packing into (B, H/2 * W/2, 4C) tokens and back happens here (``pack_latents``, ``unpack_latents``,
``latent_image_ids``), row-major as the Flux pipeline does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .load import ModelLoadError

FAMILIES = ("pixel", "sd", "sdxl", "sd3", "flux")
TEXT_FAMILIES = ("sd", "sdxl", "sd3", "flux")
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, fed to the guidance embedding of guidance-distilled models
SDXL_TIME_IDS = 6  # original (H, W), crop top-left (0, 0), target (H, W)


def denoiser_family(model: torch.nn.Module) -> str:
    """The family of a loaded diffusers denoiser (see the module docstring), or ModelLoadError."""
    name = type(model).__name__
    if name == "UNet2DModel":
        return "pixel"
    if name == "UNet2DConditionModel":
        return "sdxl" if model.config.get("addition_embed_type") == "text_time" else "sd"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise ModelLoadError(f"diffcirc runs UNet2DModel, UNet2DConditionModel (SD 1.x/2.x, SDXL), SD3Transformer2DModel "
                         f"and FluxTransformer2DModel denoisers, not {name}")


def _single(value, what: str) -> int:
    """A config value that may be given per block (a list of equal values) as one int."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelLoadError(f"the denoiser's {what} differs between blocks ({value}); diffcirc binds one prompt "
                                 "embedding to every block")
        value = value[0]
    return int(value)


def conditioning_dims(model: torch.nn.Module) -> tuple:
    """(C, P): the channels of the prompt embeddings (1, L, C) the denoiser takes, and of its pooled
    embedding (1, P), or None where it takes none. (None, None) for a pixel model."""
    family, c = denoiser_family(model), model.config
    if family == "pixel":
        return None, None
    if family == "sd":
        return _single(c.cross_attention_dim, "cross_attention_dim"), None
    if family == "sdxl":
        pooled = int(c.projection_class_embeddings_input_dim) - SDXL_TIME_IDS * int(c.addition_time_embed_dim)
        return _single(c.cross_attention_dim, "cross_attention_dim"), pooled
    return int(c.joint_attention_dim), int(c.pooled_projection_dim)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, patches row-major, a token's
    channels (c, dy, dx) with dx fastest, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs latents in 2x2 patches: height and width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of ``pack_latents`` (height, width: of the latents)."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"{n} tokens of {c4} channels do not unpack to a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(rows * cols, 3) position ids of packed tokens, (0, row, col) row-major, as the Flux pipeline builds them."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


@dataclass
class Conditioning:
    """A prompt's embeddings, encoded once (or read from a file), batch 1.

    prompt_embeds: (1, L, C); pooled_prompt_embeds: (1, P) or None; tokens: the L token texts (None
    when unknown, e.g. embeddings from a file); prompt_tokens: indices of the prompt's own tokens
    (not start, end or padding), every index when unknown; prompt: the text (None from a file).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    tokens: Optional[list] = None
    prompt_tokens: Optional[list] = None
    prompt: Optional[str] = None

    @property
    def n_tokens(self) -> int:
        return int(self.prompt_embeds.shape[1])

    def shown_tokens(self) -> list:
        """The token indices worth a heatmap: the prompt's own, else every one."""
        return list(self.prompt_tokens) if self.prompt_tokens is not None else list(range(self.n_tokens))


def check_conditioning(model: torch.nn.Module, conditioning: Optional[Conditioning], where: str = "") -> None:
    """Raise ``ModelLoadError`` unless ``conditioning`` fits the denoiser: none for a pixel model;
    prompt_embeds (1, L, C) and, where the model takes one, pooled_prompt_embeds (1, P), with the
    model's C and P. ``where`` names the source in messages (a file)."""
    family = denoiser_family(model)
    channels, pooled = conditioning_dims(model)
    source = f" in {where}" if where else ""
    if family == "pixel":
        if conditioning is not None:
            raise ModelLoadError("the model is an unconditional UNet2DModel: it takes no prompt")
        return
    if conditioning is None:
        raise ModelLoadError(f"the {family} denoiser needs prompt embeddings: give a prompt (the pipeline's text "
                             "encoders encode it) or a prompt_embeds file")
    e = conditioning.prompt_embeds
    if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[0] != 1 or e.shape[2] != channels:
        raise ModelLoadError(f"prompt_embeds{source} must be (1, L, {channels}) for this {family} denoiser, got "
                             f"{tuple(getattr(e, 'shape', ()))}")
    p = conditioning.pooled_prompt_embeds
    if pooled is not None and (not isinstance(p, torch.Tensor) or tuple(p.shape) != (1, pooled)):
        got = "none" if p is None else tuple(p.shape)
        raise ModelLoadError(f"pooled_prompt_embeds{source} must be (1, {pooled}) for this {family} denoiser, "
                             f"got {got}")


class Denoiser:
    """A denoiser with its conditioning bound: ``predict(x_t, t)`` -> the model's output (B, C, H, W) float32.

    vae_scale_factor: pixels per latent (SDXL's time ids are in pixels); guidance: the value of
    Flux's guidance embedding (only where the config has ``guidance_embeds``).
    """

    def __init__(self, model: torch.nn.Module, conditioning: Optional[Conditioning] = None, *,
                 vae_scale_factor: int = 8, guidance: float = FLUX_GUIDANCE):
        self.model = model
        self.family = denoiser_family(model)
        check_conditioning(model, conditioning)
        self.conditioning = conditioning
        self.vae_scale_factor = int(vae_scale_factor)
        self.guidance = float(guidance)
        if self.family == "sdxl":
            expected = model.add_embedding.linear_1.in_features
            pooled = conditioning.pooled_prompt_embeds.shape[-1]
            given = SDXL_TIME_IDS * int(model.config.addition_time_embed_dim) + pooled
            if expected != given:  # the check StableDiffusionXLPipeline._get_add_time_ids makes
                raise ModelLoadError(f"the SDXL UNet expects an added embedding of {expected} values, but time ids and "
                                     f"the pooled embedding make {given}")

    def with_model(self, model: torch.nn.Module) -> "Denoiser":
        """The same conditioning bound to another model of the same architecture (e.g. a random-weights control)."""
        return Denoiser(model, self.conditioning, vae_scale_factor=self.vae_scale_factor, guidance=self.guidance)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _context(self, batch: int):
        c, device, dtype = self.conditioning, self.device, self.dtype
        embeds = c.prompt_embeds.to(device=device, dtype=dtype).expand(batch, -1, -1)
        pooled = None if c.pooled_prompt_embeds is None else \
            c.pooled_prompt_embeds.to(device=device, dtype=dtype).expand(batch, -1)
        return embeds, pooled

    def predict(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """x_t: (B, C, H, W) latents (pixels for a pixel model); t: one timestep in the scheduler's
        units. Returns the model's prediction (B, C, H, W) float32 on the model's device."""
        b, _, h, w = x_t.shape
        x = x_t.to(device=self.device, dtype=self.dtype)
        if self.family in ("pixel", "sd", "sdxl"):
            tt = torch.full((b,), t, device=x.device, dtype=torch.long if float(t) == int(t) else torch.float32)
            if self.family == "pixel":
                return self.model(x, tt).sample.float()
            embeds, pooled = self._context(b)
            extra = {}
            if self.family == "sdxl":
                size = (h * self.vae_scale_factor, w * self.vae_scale_factor)
                time_ids = torch.tensor([[*size, 0, 0, *size]], device=x.device, dtype=embeds.dtype).expand(b, -1)
                extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            return self.model(x, tt, encoder_hidden_states=embeds, **extra).sample.float()
        embeds, pooled = self._context(b)
        tt = torch.full((b,), float(t), device=x.device, dtype=x.dtype)
        if self.family == "sd3":
            return self.model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                              timestep=tt).sample.float()
        guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32) \
            if self.model.config.get("guidance_embeds", False) else None
        out = self.model(hidden_states=pack_latents(x), encoder_hidden_states=embeds, pooled_projections=pooled,
                         timestep=tt / 1000, img_ids=latent_image_ids(h // 2, w // 2, x.device, x.dtype),
                         txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                         guidance=guidance).sample
        return unpack_latents(out, h, w).float()
