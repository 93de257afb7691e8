"""Image-space maps the analysis compares heads against, and role-relevant errors of predicted x0.

Images are (B, 3, S, S) in [-1, 1]; maps are (B, S, S). Everything is plain torch, batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1, S, S), ITU-R BT.601 weights."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(dim=1, keepdim=True)


def _box_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, [size // 2] * 4, mode="replicate"), size, stride=1)


def edge_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance: (B, 3, S, S) -> (B, S, S)."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype,
                      device=images.device)
    kernels = torch.stack((gx, gx.t()))[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(luminance(images), [1] * 4, mode="replicate"), kernels)
    return g.square().sum(dim=1).sqrt()


def high_pass(images: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Luminance minus its local mean: the fine detail. (B, 3, S, S) -> (B, S, S)."""
    y = luminance(images)
    return (y - _box_blur(y, size))[:, 0]


def texture_energy(images: torch.Tensor, size: int = 7) -> torch.Tensor:
    """Local energy of the high-pass luminance (a Laws-style texture measure): (B, S, S)."""
    return _box_blur(high_pass(images)[:, None].square(), size)[:, 0]


def to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Average-pools (B, S, S) maps to a token grid, flattened row-major: (B, h * w)."""
    return F.adaptive_avg_pool2d(maps[:, None], grid).flatten(1)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching rows: (..., N) x (..., N) -> (...); 0 where either is constant."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    denom = a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt()
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp_min(1e-30), torch.zeros_like(denom))


def region_average(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Replaces every pixel by the mean of its label region (per image and channel).

    images (B, C, S, S), labels (B, S, S) int -> (B, C, S, S).
    """
    B, C, S, _ = images.shape
    lab = labels.reshape(B, 1, S * S).long()
    n_regions = int(lab.max().item()) + 1 if lab.numel() else 1
    flat = images.reshape(B, C, S * S)
    sums = torch.zeros(B, C, n_regions, dtype=images.dtype, device=images.device).scatter_add_(2, lab.expand(B, C, -1), flat)
    counts = torch.zeros(B, 1, n_regions, dtype=images.dtype, device=images.device).scatter_add_(
        2, lab, torch.ones_like(flat[:, :1]))
    means = sums / counts.clamp_min(1)
    return means.gather(2, lab.expand(B, C, -1)).reshape(B, C, S, S)


def role_errors(x0_pred: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-image errors of a predicted clean image, each (B,):

    - ``edge``: MSE between Sobel edge maps (what edge-detection heads should protect);
    - ``high_freq``: MSE between high-pass images (texture);
    - ``part``: MSE between region-averaged images (content at the level of parts / regions).
    """
    per_image = lambda d: d.flatten(1).mean(dim=1)  # noqa: E731
    return {
        "edge": per_image((edge_magnitude(x0_pred) - edge_magnitude(x0)).square()),
        "high_freq": per_image((high_pass(x0_pred) - high_pass(x0)).square()),
        "part": per_image((region_average(x0_pred, labels) - region_average(x0, labels)).square()),
    }
