"""Diffusers transformer models for the processor tests, and a float64 oracle of their attention.

Builders: tiny random SD3 / SD3.5 (dual attention, RMS q/k norms), Flux (double- and single-stream
blocks, RoPE from the ids the Flux pipeline builds), AuraFlow and Sana, plus the published
architectures of SD3-medium's and Flux-dev's transformers (``tests/data/published_transformer_configs.json``)
cut to two blocks of each kind. Each is fp32, seeded, in eval mode, and comes with its inputs and
what a session should find in it (``Built``). Nothing is downloaded.

Oracle: ``attention_probabilities`` recomputes one attention call's softmax in float64 from the
module's own weights and the call's inputs, following the diffusers processor step by step, with
none of diffcirc's code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import AuraFlowTransformer2DModel, FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import no_init_weights
from diffusers.models.normalization import RMSNorm

PUBLISHED_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "published_transformer_configs.json"
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
AURAFLOW_REGISTERS = 8  # learned register tokens AuraFlow puts before the text


@dataclass
class Built:
    """A model with the inputs of its forward passes and what a ``Session`` should find in it.

    family: whose processor its attention layers follow ("sd3", "flux", "auraflow", "sana").
    inputs(seed): keyword arguments of one forward pass; same shapes for every seed.
    kinds: {layer: "joint" | "self" | "cross"} of the layers with a fused counterpart;
    skipped: layers without one (Sana's linear attention).
    grid: (h, w) of the image tokens after patchification, row-major; text_tokens: the context
    tokens every joint layer sees (AuraFlow's registers included).
    """

    model: torch.nn.Module
    family: str
    inputs: Callable[[int], dict]
    kinds: dict
    grid: tuple
    text_tokens: int
    batch: int
    skipped: tuple = ()
    seed: int = 1

    def run(self, seed: Optional[int] = None) -> torch.Tensor:
        """The model's output for inputs(seed) (default: self.seed): (B, C, H, W), or (B, N, C) for Flux."""
        return self.model(**self.inputs(self.seed if seed is None else seed)).sample

    def label_map(self) -> torch.Tensor:
        """(B, 2h, 2w) int64 region ids: a rectangle on every element, random ids on the right half of the others."""
        h, w = 2 * self.grid[0], 2 * self.grid[1]
        labels = torch.zeros(self.batch, h, w, dtype=torch.long)
        labels[:, h // 4:3 * h // 4, w // 6:w // 2] = 1
        labels[1:, :, w // 2:] = torch.randint(2, 5, (self.batch - 1, h, w - w // 2), generator=_generator(7))
        return labels


def attention_modules(model: torch.nn.Module) -> dict:
    """{name: module} of diffusers' attention modules (``Attention`` and ``FluxAttention``-like ones)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))}


def _sharpen(model: torch.nn.Module, gain: float = 4.0) -> torch.nn.Module:
    """Peaks the attention of random weights (nearly uniform otherwise, which would make statistics weak):
    the query's norm weight is scaled where there is one (a projection in front of a norm would be undone)."""
    with torch.no_grad():
        for m in attention_modules(model).values():
            for norm_name, projection_name in (("norm_q", "to_q"), ("norm_added_q", "add_q_proj")):
                norm, projection = getattr(m, norm_name, None), getattr(m, projection_name, None)
                target = projection if norm is None else norm
                if getattr(target, "weight", None) is not None:
                    target.weight.mul_(gain)
    return model.eval()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- tiny models ----------------------------------------------------------------------------------------

def sd3(dual_attention: bool = False, qk_norm: Optional[str] = None, batch: int = 2, latent_hw=(8, 12),
        text: int = 5, seed: int = 0) -> Built:
    """SD3 MMDiT, 2 blocks x 4 heads x 8 (the last ``context_pre_only``); dual_attention: SD3.5's
    self-attention ``attn2`` in block 0. Patch 2: an (8, 12) latent is a (4, 6) token grid."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=16, dual_attention_layers=(0,) if dual_attention else (), qk_norm=qk_norm)

    def inputs(s: int) -> dict:
        g = _generator(s)
        return {"hidden_states": torch.randn(batch, 4, *latent_hw, generator=g),
                "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
                "pooled_projections": torch.randn(batch, 16, generator=g),
                "timestep": torch.linspace(200.0, 800.0, batch)}

    kinds = {f"transformer_blocks.{i}.attn": "joint" for i in range(2)}
    if dual_attention:
        kinds["transformer_blocks.0.attn2"] = "self"
    return Built(_sharpen(model), "sd3", inputs, kinds, (latent_hw[0] // 2, latent_hw[1] // 2), text, batch)


def flux_image_ids(grid) -> torch.Tensor:
    """(h*w, 3) ids as the Flux pipeline builds them: (0, row, col), row-major."""
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_inputs(batch: int, grid, text: int, channels: int, context_dim: int, pooled_dim: int, guidance: bool):
    def inputs(s: int) -> dict:
        g = _generator(s)
        args = {"hidden_states": torch.randn(batch, grid[0] * grid[1], channels, generator=g),
                "encoder_hidden_states": torch.randn(batch, text, context_dim, generator=g),
                "pooled_projections": torch.randn(batch, pooled_dim, generator=g),
                "timestep": torch.linspace(0.3, 0.8, batch),
                "img_ids": flux_image_ids(grid), "txt_ids": torch.zeros(text, 3)}
        if guidance:
            args["guidance"] = torch.full((batch,), 3.5)
        return args
    return inputs


def _flux_kinds(double: int, single: int) -> dict:
    return {**{f"transformer_blocks.{i}.attn": "joint" for i in range(double)},
            **{f"single_transformer_blocks.{i}.attn": "joint" for i in range(single)}}


def flux(batch: int = 2, grid=(4, 6), text: int = 5, seed: int = 0) -> Built:
    """Flux, 2 double- and 2 single-stream blocks x 4 heads x 16, RoPE axes (4, 6, 6); packed latents (B, h*w, 4)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return Built(_sharpen(model), "flux", _flux_inputs(batch, grid, text, 4, 16, 16, False), _flux_kinds(2, 2),
                 tuple(grid), text, batch)


def auraflow(batch: int = 2, latent_hw=(8, 12), text: int = 5, seed: int = 0) -> Built:
    """AuraFlow, 1 MMDiT and 1 single DiT block x 4 heads x 8 (LayerNorm q/k norms without weights)."""
    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=4,
                                       joint_attention_dim=16, caption_projection_dim=32, pos_embed_max_size=256)

    def inputs(s: int) -> dict:
        g = _generator(s)
        return {"hidden_states": torch.randn(batch, 4, *latent_hw, generator=g),
                "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
                "timestep": torch.linspace(0.2, 0.9, batch)}

    kinds = {"joint_transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"}
    return Built(_sharpen(model), "auraflow", inputs, kinds, (latent_hw[0] // 2, latent_hw[1] // 2),
                 text + AURAFLOW_REGISTERS, batch)


def sana(batch: int = 2, latent_hw=(4, 6), text: int = 6, layers: int = 2, seed: int = 0) -> Built:
    """Sana: linear self-attention (attn1, no counterpart) and softmax cross-attention (attn2) with
    RMS q/k norms across heads; element b of the batch keeps text - 2b tokens (a padding mask)."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=layers, num_cross_attention_heads=4, cross_attention_head_dim=4,
                                   cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=1,
                                   qk_norm="rms_norm_across_heads")

    def inputs(s: int) -> dict:
        g = _generator(s)
        mask = torch.ones(batch, text)
        for b in range(batch):
            mask[b, text - 2 * b:] = 0
        return {"hidden_states": torch.randn(batch, 4, *latent_hw, generator=g),
                "encoder_hidden_states": torch.randn(batch, text, 8, generator=g),
                "encoder_attention_mask": mask, "timestep": torch.linspace(100.0, 900.0, batch)}

    kinds = {f"transformer_blocks.{i}.attn2": "cross" for i in range(layers)}
    skipped = tuple(f"transformer_blocks.{i}.attn1" for i in range(layers))
    return Built(_sharpen(model), "sana", inputs, kinds, tuple(latent_hw), text, batch, skipped=skipped)


# ---- published architectures ---------------------------------------------------------------------------

def published_config(model_id: str) -> dict:
    """The transformer/config.json values of model_id, without the loader's keys (``_class_name``, ...)."""
    config = json.loads(PUBLISHED_CONFIGS.read_text())[model_id]
    return {k: v for k, v in config.items() if not k.startswith("_")}


_POOL_SLACK = (1 << 20) + 7  # room for the seeded offsets: views of one pool start up to this far apart


def _random_views(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights without drawing a billion fresh samples (Flux-dev's blocks) or holding
    them: the parameters of one fan-in are views, at seeded offsets, into one pool of N(0, 1 / fan_in)
    samples; norm weights read a pool of 1 + N(0, 0.01), other vectors (biases) one of N(0, 0.01).
    Read-only (requires_grad False): for forward passes."""
    g = _generator(seed)
    groups: dict = {}  # (what, fan_in) -> [(module, name, shape)]
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            key = ("weight", p[0].numel()) if p.dim() > 1 else ("norm" if name == "weight" else "bias", 1)
            groups.setdefault(key, []).append((module, name, p.shape))
    for (what, fan_in), members in groups.items():
        largest = max(math.prod(shape) for _, _, shape in members)
        pool = torch.randn(largest + _POOL_SLACK, generator=g)
        pool.mul_(1.0 / math.sqrt(fan_in) if what == "weight" else 0.1)
        if what == "norm":
            pool.add_(1.0)
        for module, name, shape in members:
            start = int(torch.randint(_POOL_SLACK, (1,), generator=g))
            view = pool[start:start + math.prod(shape)].view(shape)
            module._parameters[name] = torch.nn.Parameter(view, requires_grad=False)
    return model.eval()


def sd3_medium(latent_hw=(16, 16), text: int = 8, seed: int = 0) -> Built:
    """SD3-medium's transformer (24 heads x 64, hidden 1536) cut to 2 blocks; batch 1, a (16, 16) latent."""
    config = {**published_config(SD3_MEDIUM), "num_layers": 2}
    with no_init_weights():
        model = SD3Transformer2DModel(**config)
    _random_views(model, seed)

    def inputs(s: int) -> dict:
        g = _generator(s)
        return {"hidden_states": torch.randn(1, config["in_channels"], *latent_hw, generator=g),
                "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g),
                "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
                "timestep": torch.tensor([500.0])}

    p = config["patch_size"]
    kinds = {f"transformer_blocks.{i}.attn": "joint" for i in range(2)}
    return Built(model, "sd3", inputs, kinds, (latent_hw[0] // p, latent_hw[1] // p), text, 1)


def flux_dev(grid=(8, 8), text: int = 8, seed: int = 0) -> Built:
    """Flux-dev's transformer (24 heads x 128, RoPE axes 16/56/56, guidance embedding) cut to 2 double-
    and 2 single-stream blocks; batch 1, an (8, 8) grid of packed latents."""
    config = {**published_config(FLUX_DEV), "num_layers": 2, "num_single_layers": 2}
    with no_init_weights():
        model = FluxTransformer2DModel(**config)
    _random_views(model, seed)
    inputs = _flux_inputs(1, grid, text, config["in_channels"], config["joint_attention_dim"],
                          config["pooled_projection_dim"], config["guidance_embeds"])
    return Built(model, "flux", inputs, _flux_kinds(2, 2), tuple(grid), text, 1)


# ---- float64 oracle ------------------------------------------------------------------------------------

def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


def _norm(norm: Optional[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """diffusers' q/k norms in float64: LayerNorm (FP32LayerNorm too), diffusers' and torch's RMSNorm."""
    if norm is None:
        return x
    weight = None if getattr(norm, "weight", None) is None else norm.weight.double()
    bias = None if getattr(norm, "bias", None) is None else norm.bias.double()
    if isinstance(norm, torch.nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    if isinstance(norm, (RMSNorm, torch.nn.RMSNorm)):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x = x if weight is None else x * weight
        return x if bias is None else x + bias
    raise TypeError(f"no float64 oracle for the norm {type(norm).__name__}")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding on (B, H, N, D): channel pairs (2i, 2i+1) rotated by the angle whose
    cos / sin (N, D) hold it repeated for both channels of the pair."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.double() + rotated * sin.double()


def attention_probabilities(family: str, attn: torch.nn.Module, hidden_states: torch.Tensor,
                            encoder_hidden_states: Optional[torch.Tensor] = None,
                            attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None) -> torch.Tensor:
    """(B, H, Nq, Nk) float64 softmax of one call of attn, its queries and keys in the processor's order.

    family: "sd3" (JointAttnProcessor2_0: image tokens, then context), "flux" (FluxAttnProcessor:
    context, then image; RoPE over the joined sequence), "auraflow" (AuraFlowAttnProcessor2_0:
    context, then image; scale attn.scale), "sana" (SanaAttnProcessor2_0: cross-attention, q/k
    norms before the head split, attention_mask an additive bias (B, 1, Nk)). Inputs as the module got them.
    """
    heads = attn.heads
    if family == "sana":
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = _heads(_norm(attn.norm_q, _linear(attn.to_q, hidden_states)), heads)
        key = _heads(_norm(attn.norm_k, _linear(attn.to_k, context)), heads)
    else:
        query = _norm(attn.norm_q, _heads(_linear(attn.to_q, hidden_states), heads))
        key = _norm(attn.norm_k, _heads(_linear(attn.to_k, hidden_states), heads))
        if encoder_hidden_states is not None:
            c_query = _norm(attn.norm_added_q, _heads(_linear(attn.add_q_proj, encoder_hidden_states), heads))
            c_key = _norm(attn.norm_added_k, _heads(_linear(attn.add_k_proj, encoder_hidden_states), heads))
            image_first = family == "sd3"
            query = torch.cat((query, c_query) if image_first else (c_query, query), dim=2)
            key = torch.cat((key, c_key) if image_first else (c_key, key), dim=2)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    scale = attn.scale if family == "auraflow" else query.shape[-1] ** -0.5
    logits = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        logits = logits + attention_mask.double().reshape(attention_mask.shape[0], 1, -1, attention_mask.shape[-1])
    return logits.softmax(dim=-1)
