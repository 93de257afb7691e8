"""Ancestral DDPM sampling (optionally on a strided timestep subset) and sample grids."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from ..files import write_image


@torch.no_grad()
def sample(unet, scheduler, n: int = 16, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Draw n images (n, C, S, S) in [-1, 1] with ``steps`` DDPM steps; the RNG is private (``seed``)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g).to(unet.device, unet.dtype)
    for t in sched.timesteps:
        eps = unet(x, t).sample
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 1) -> None:
    """images: (n, 3, S, S) in [-1, 1] -> a PNG grid with a 1-pixel gap, upscaled by ``scale``."""
    n, _, s, _ = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.ones((rows * (s + 1) + 1, nrow * (s + 1) + 1, 3), np.float32)
    arr = ((images.float().cpu().permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[1 + r * (s + 1):1 + r * (s + 1) + s, 1 + c * (s + 1):1 + c * (s + 1) + s] = arr[k]
    pil = Image.fromarray(np.round(grid * 255).astype(np.uint8))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    write_image(pil, path)
