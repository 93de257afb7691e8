"""The diffusers models and inputs of the UNet benchmarks, built from fixed seeds (no downloads):
an SD 1.x-like transformer block and a paper-like tiny UNet, with a label map for label_mass."""

from __future__ import annotations

import torch
from diffusers import Transformer2DModel, UNet2DModel


def sd_block(width: int, latent: int, batch: int, device):
    """(model, forward() -> (batch, width, latent, latent), batch): Transformer2DModel like one
    SD 1.x block, 8 heads of width / 8, cross-attention to 77 text tokens of 768."""
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=8, attention_head_dim=width // 8, in_channels=width,
                               norm_num_groups=32, cross_attention_dim=768, num_layers=1).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, latent, latent, generator=g).to(device)
    enc = torch.randn(batch, 77, 768, generator=g).to(device)
    return model, (lambda: model(x, encoder_hidden_states=enc).sample), batch


def tiny_unet_model(device) -> UNet2DModel:
    """UNet2DModel for 32x32 images; attention at 8x8: 2 layers in the last down block + 1 in the
    mid block, 8 heads of 32 each."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(64, 128, 256), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32,
                       norm_num_groups=32).eval().to(device)


def tiny_unet_inputs(batch: int, device, seed: int) -> tuple:
    """(x (batch, 3, 32, 32) from seed, t (batch,) = 500): one noisy image batch at timestep 500."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    return x, torch.full((batch,), 500, device=device)


def tiny_unet(batch: int, device):
    """(model, forward() -> (batch, 3, 32, 32), batch): tiny_unet_model on tiny_unet_inputs(seed 1)."""
    model = tiny_unet_model(device)
    x, t = tiny_unet_inputs(batch, device, seed=1)
    return model, (lambda: model(x, t).sample), batch


def label_map(batch: int, size: int, device) -> torch.Tensor:
    """(batch, size, size) long: a centred square "face" (1) on background (0), at image resolution."""
    labels = torch.zeros(batch, size, size, dtype=torch.long, device=device)
    labels[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return labels
