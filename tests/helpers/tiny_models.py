"""Tiny randomly initialised diffusers models and an independent attention oracle for the processor tests.

Nothing is downloaded. Query weights are amplified so that attention is peaked (random init
attends almost uniformly, which would make entropy tests weak).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


def attention_modules(model: torch.nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def set_processors(model: torch.nn.Module, factory) -> None:
    """Attention.set_processor(factory(name)) on every layer (UNet2DModel has no set_attn_processor)."""
    for name, m in attention_modules(model).items():
        m.set_processor(factory(name))


def _sharpen(model: torch.nn.Module, gain: float = 4.0) -> torch.nn.Module:
    with torch.no_grad():
        for m in attention_modules(model).values():
            m.to_q.weight.mul_(gain)
    return model.eval()


def unet2d(seed: int = 0, sample_size: int = 16) -> UNet2DModel:
    """3 attention layers x 8 heads x head dim 8, at 1/2 of the input resolution (8x8 for 16x16)."""
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8)
    return _sharpen(model)


def cond_unet(seed: int = 0) -> UNet2DConditionModel:
    """Transformer blocks with self- (attn1) and cross-attention (attn2), 4 heads x 8, at 1x and 1/2 resolution."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    return _sharpen(model)


def transformer2d(seed: int = 0) -> Transformer2DModel:
    torch.manual_seed(seed)
    model = Transformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=32, norm_num_groups=8,
                               cross_attention_dim=24, num_layers=1)
    return _sharpen(model)


def unet2d_inputs(batch: int = 2, hw=(16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *hw, generator=g)
    t = torch.tensor([10, 500, 900, 250][:batch] * (batch // 4 + 1))[:batch]
    return x, t


def cond_inputs(batch: int = 2, hw=(8, 8), text_len: int = 7, seed: int = 2):
    """(sample, timestep, encoder_hidden_states, encoder_attention_mask); element b keeps text_len - 2*b tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    enc = torch.randn(batch, text_len, 24, generator=g)
    mask = torch.ones(batch, text_len)
    for b in range(batch):
        mask[b, text_len - 2 * b:] = 0
    return x, torch.tensor(300), enc, mask


def reset_default(model: torch.nn.Module) -> None:
    set_processors(model, lambda name: AttnProcessor2_0())


class ProbeProcessor:
    """diffusers' classic AttnProcessor steps, keeping the probabilities of attn.get_attention_scores.

    probs[name]: (B, H, Nq, Nk) float64; spatial[name]: (h, w) for 4-D inputs.
    """

    def __init__(self, name: str, probs: dict, spatial: dict):
        self.name, self.probs, self.spatial = name, probs, spatial

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            self.spatial[self.name] = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.probs[self.name] = probs.double().view(batch_size, attn.heads, *probs.shape[1:])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def probe(model: torch.nn.Module, run) -> tuple:
    """Runs run() with ProbeProcessor on every layer; returns (probs, spatial) and restores AttnProcessor2_0."""
    probs, spatial = {}, {}
    set_processors(model, lambda name: ProbeProcessor(name, probs, spatial))
    try:
        with torch.no_grad():
            run()
    finally:
        reset_default(model)
    return probs, spatial


def oracle_entropy(p: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq) nats from probabilities (B, H, Nq, Nk)."""
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def oracle_distance(p: torch.Tensor, grid) -> torch.Tensor:
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pts = torch.stack((((r + 0.5) / h).reshape(-1), ((c + 0.5) / w).reshape(-1)), dim=-1)
    d = (pts[:, None, :] - pts[None, :, :]).pow(2).sum(-1).sqrt()  # (N, N)
    return (p * d).sum(-1)


def oracle_token_labels(label_map: torch.Tensor, grid) -> torch.Tensor:
    """(B, N): nearest-exact resampling by torch, an implementation independent of diffcirc's."""
    out = F.interpolate(label_map[:, None].double(), size=tuple(grid), mode="nearest-exact")
    return out[:, 0].reshape(label_map.shape[0], -1).long()


def oracle_label_mass(p: torch.Tensor, token_labels: torch.Tensor) -> torch.Tensor:
    same = (token_labels[:, :, None] == token_labels[:, None, :]).double()  # (B, N, N)
    return (p * same[:, None]).sum(-1)
