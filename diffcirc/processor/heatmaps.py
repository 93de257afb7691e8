"""``TokenHeatmaps``: DAAM-style per-token heatmaps of cross and joint attention, without attention maps.

For each image query of a cross-attention layer (UNets, Sana) or a joint layer (SD3, Flux,
AuraFlow), the fused op returns the attention probability on each text token (key-group mass,
one group per text token; image keys in no group). Inside ``session.heatmaps(maps)`` each such
layer call adds, per batch element,

    sum over heads of mass (H, h * w, T) -> (T, h, w) on the layer's image-token grid
    -> bilinearly resampled to ``size`` (``F.interpolate``, align_corners=False)

into the element's image (``set_tags(image_ids=...)``, default: the element's index). The sum
runs over layers, heads, calls and timesteps, so memory is O(images x T x size), independent of
the number of timesteps. ``mean(image)`` divides by the number of layer calls added; DAAM's
per-token normalisation (``normalised``) scales each token's map to [0, 1].

Text tokens are numbered as the layer's keys (cross) or the joint sequence's non-image tokens
(joint) are, in order: every layer of one model must see the same number T of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def _scalar(v):
    return v.item() if isinstance(v, (torch.Tensor, np.generic)) else v


class TokenHeatmaps:
    """Per-image, per-text-token heatmaps at one resolution, summed over layers, heads and calls.

    Args:
        size: (S_h, S_w) resolution of the heatmaps (e.g. the image's or the latent's).
        layers: names of the cross / joint layers to include; None: every one of them.
    """

    def __init__(self, size: Sequence[int], layers: Optional[Sequence[str]] = None):
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (S_h, S_w) of positive ints, got {size}")
        self.size = size
        self.layers = None if layers is None else set(layers)
        self.n_tokens: Optional[int] = None
        self._image_ids = None
        self._sums: dict = {}  # image id -> float64 (T, S_h, S_w)
        self._counts: dict = {}  # image id -> number of layer calls added
        self._seen_layers: dict = {}  # layer -> its first call's (grid, T), to name mismatches

    def set_tags(self, *, image_ids=None) -> None:
        """image_ids: (B,) ids of the next forward passes' batch elements (tiled when shorter); None: 0..B-1."""
        self._image_ids = image_ids

    def wants(self, layer: str) -> bool:
        return self.layers is None or layer in self.layers

    # ---- called by Session -----------------------------------------------------------------------
    def add(self, layer: str, grid: tuple, mass: torch.Tensor) -> None:
        """Folds in one layer call. mass: (B, H, h * w, T) float32 probabilities on each text token,
        or (B, 1, h * w, T) already summed over heads (as ``Session.heatmaps`` asks the kernel)."""
        batch, _, n_queries, n_tokens = mass.shape
        h, w = grid
        if h * w != n_queries:
            raise ValueError(f"layer {layer}: {n_queries} image queries do not fill its grid {grid}")
        if self.n_tokens is None:
            self.n_tokens = n_tokens
        elif n_tokens != self.n_tokens:
            first = next(iter(self._seen_layers))
            raise ValueError(f"layer {layer} sees {n_tokens} text tokens, but layer {first} saw {self.n_tokens}: "
                             "the heatmaps of one TokenHeatmaps must share one tokenisation")
        self._seen_layers.setdefault(layer, (grid, n_tokens))
        summed = mass.detach().double().sum(dim=1)  # (B, h*w, T)
        maps = summed.transpose(1, 2).reshape(batch, n_tokens, h, w)
        if (h, w) != self.size:
            maps = F.interpolate(maps, size=self.size, mode="bilinear", align_corners=False)
        for e, image in enumerate(self._ids(batch)):
            if image in self._sums:
                self._sums[image] += maps[e]
                self._counts[image] += 1
            else:
                self._sums[image] = maps[e].clone()
                self._counts[image] = 1

    def _ids(self, batch: int) -> list:
        if self._image_ids is None:
            return list(range(batch))
        ids = self._image_ids
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [_scalar(i) for i in ids]
        if not ids or batch % len(ids):
            raise ValueError(f"image_ids: {len(ids)} values for a forward batch of {batch} (need equal or a divisor)")
        return [ids[e % len(ids)] for e in range(batch)]

    # ---- results ---------------------------------------------------------------------------------
    @property
    def images(self) -> list:
        return list(self._sums)

    def count(self, image) -> int:
        """Number of layer calls summed into image's heatmaps."""
        return self._counts[self._known(image)]

    def sum(self, image) -> torch.Tensor:
        """float64 (T, S_h, S_w): the heatmaps of image summed over layers, heads and calls."""
        return self._sums[self._known(image)].clone()

    def mean(self, image) -> torch.Tensor:
        """float64 (T, S_h, S_w): ``sum`` over the number of layer calls (mass per head summed, per call)."""
        return self.sum(image) / self.count(image)

    def normalised(self, image) -> torch.Tensor:
        """float64 (T, S_h, S_w): each token's map scaled to [0, 1] by its maximum (DAAM's display scale)."""
        m = self.sum(image)
        top = m.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        return m / top[:, None, None]

    def to_frame(self, tokens: Optional[Sequence[int]] = None) -> pd.DataFrame:
        """Columns [image, token, row, col, value] of ``mean`` (tokens: the token indices to include; None: all)."""
        frames = []
        for image in self._sums:
            m = self.mean(image)
            which = range(m.shape[0]) if tokens is None else list(tokens)
            sel = m[list(which)].cpu().numpy()  # (T', S_h, S_w)
            t, r, c = np.meshgrid(np.asarray(list(which)), np.arange(self.size[0]), np.arange(self.size[1]),
                                  indexing="ij")
            frames.append(pd.DataFrame({"image": [image] * sel.size, "token": t.ravel(), "row": r.ravel(),
                                        "col": c.ravel(), "value": sel.ravel()}))
        if not frames:
            return pd.DataFrame(columns=["image", "token", "row", "col", "value"])
        return pd.concat(frames, ignore_index=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._sums.values())

    def _known(self, image):
        if image not in self._sums:
            raise KeyError(f"no heatmaps for image {image!r}; images: {self.images[:8]}")
        return image
