"""PNG overlays of token heatmaps on their images (DAAM's display): one file per (image, token).

Each token's map (``TokenHeatmaps.normalised``: scaled to [0, 1] by its maximum) is bilinearly
resized to the image, coloured with a matplotlib colormap and alpha-blended onto the image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..files import write_image


def _rgb(image) -> np.ndarray:
    """float (S_h, S_w, 3) in [0, 1] from a PIL image, a uint8 / float array (S_h, S_w[, 3]) or a (3, S_h, S_w) tensor."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    a = np.asarray(image)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (S_h, S_w), (S_h, S_w, 3) or (3, S_h, S_w), got shape {a.shape}")
    return np.clip(np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a, 0.0, 1.0)


def overlay(image, heatmap: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """uint8 (S_h, S_w, 3): heatmap (h, w) in [0, 1] resized to image and blended onto it with weight alpha."""
    from matplotlib import colormaps

    rgb = _rgb(image)
    resized = F.interpolate(heatmap.detach().double().cpu()[None, None], size=rgb.shape[:2], mode="bilinear",
                            align_corners=False)[0, 0].clamp(0, 1).numpy()
    coloured = colormaps[cmap](resized)[..., :3]
    return np.round(255 * ((1 - alpha) * rgb + alpha * coloured)).astype(np.uint8)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "token"


def write_heatmap_overlays(maps, images: Mapping, out_dir, tokens: Optional[Mapping[int, str]] = None,
                           which: Optional[Sequence[int]] = None, alpha: float = 0.5) -> list:
    """Writes out_dir/<image>/<token index>_<token text>.png for each image of maps; returns the paths.

    Args:
        maps: a ``TokenHeatmaps``.
        images: {image id: the image} (PIL, array or tensor; see ``overlay``) for the ids in maps.
        tokens: {token index: its text}, for file names; which: token indices to write (default: tokens' keys, or all).
    """
    from PIL import Image

    missing = [i for i in maps.images if i not in images]
    if missing:
        raise KeyError(f"images has no entry for heatmap image(s) {missing[:5]}")
    which = list(which) if which is not None else (sorted(tokens) if tokens else range(maps.n_tokens or 0))
    paths = []
    for image_id in maps.images:
        normalised = maps.normalised(image_id)
        for t in which:
            if not 0 <= t < normalised.shape[0]:
                raise IndexError(f"token {t} out of range [0, {normalised.shape[0]})")
            name = f"{t:03d}" + (f"_{_slug(tokens[t])}" if tokens and t in tokens else "")
            path = Path(out_dir) / _slug(str(image_id)) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.append(write_image(Image.fromarray(overlay(images[image_id], normalised[t], alpha)), path))
    return paths
