"""``Recorder``: streaming per-(layer, head) aggregates of per-query attention statistics.

Each forward pass inside ``session.trace(recorder)`` hands the recorder, per layer, tensors
(B, H, Nq) of per-query values (entropy in nats, attention distance in [0, sqrt 2], same-label
mass in [0, 1]; see DESIGN.md). The recorder folds them into aggregates keyed by the current
tags (``set_tags``), the layer and the statistic: count, mean, M2 and a fixed-bin histogram per
head (``aggregates``). One sample is one query of one image, so ``mean`` is the mean per-query
value. Memory is O(tag combinations x layers x heads x bins) whatever the number of images;
only the explicitly requested extras grow with images: ``per_image`` (one mean per image,
layer, head, stat), ``image_histograms`` (one histogram per image, layer and chosen stat, the
layer's heads together: what a permutation test over images needs) and ``maps`` (full per-query
maps for chosen layers and images).

Tags are set before a forward pass and stay until the next ``set_tags``. A tag value is a
scalar (same for the whole batch) or a sequence with one value per batch element (e.g. the
condition of each element of a ``run_conditions`` batch); a sequence shorter than the batch is
tiled (element e takes value e % len), as are ``image_ids``.

The recorder keys and dispatches; ``aggregates`` holds the arithmetic, ``recorder_distributed``
the all-reduce and ``recorder_frames`` the exports.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from . import recorder_frames
from .aggregates import RECORDABLE, RecorderData, add_counts, add_map, element_histograms
from .recorder_distributed import all_reduce

_RESERVED = {"layer", "head", "stat", "image", "bin", "lo", "hi", "count", "mean", "std", "m2", "query", "row", "col",
             "value"}


def _scalar(v):
    if isinstance(v, (torch.Tensor, np.generic)):
        return v.item()
    return v


def _per_element(values, batch: int, what: str) -> list:
    """A list of batch Python scalars from a sequence or tensor whose length divides batch (tiled)."""
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    values = [_scalar(v) for v in values]
    if not values or batch % len(values):
        raise ValueError(f"{what}: {len(values)} values for a forward batch of {batch} (need equal or a divisor)")
    return [values[e % len(values)] for e in range(batch)]


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, torch.Tensor) and value.dim() > 0)


class Recorder:
    """Streams per-query statistics into per-(tags, layer, head, stat) aggregates.

    Args:
        stats: subset of ("entropy", "distance", "label_mass"). label_mass is recorded only for
            self-attention in a trace given labels; distance only for self-attention; cross-
            attention layers record entropy alone.
        bins: histogram bins per (layer, head, stat).
        per_image: also keep one mean per (tags, image, layer, head, stat); needs image_ids.
        image_histograms: stats (a subset of stats) whose histogram per (tags, image, layer) is
            also kept, over the layer's heads together; needs image_ids.
        maps: None, or {"layers": [names] | None (all), "images": [ids] | None (all),
            "stats": [names] | None (all recorded)}: keep per-query maps; needs image_ids.
    """

    def __init__(self, stats=RECORDABLE, bins: int = 64, per_image: bool = False, maps: Optional[dict] = None,
                 image_histograms=()):
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        unknown = set(stats) - set(RECORDABLE)
        if unknown or not stats:
            raise ValueError(f"Recorder stats must be a non-empty subset of {RECORDABLE}, got {stats}")
        image_histograms = (image_histograms,) if isinstance(image_histograms, str) else tuple(image_histograms)
        if set(image_histograms) - set(stats):
            raise ValueError(f"image_histograms must be a subset of the recorded stats {stats}, got {image_histograms}")
        self.image_histograms = image_histograms
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.stats = stats
        self.bins = int(bins)
        self.per_image = bool(per_image)
        self.maps = None
        if maps is not None:
            unknown_keys = set(maps) - {"layers", "images", "stats"}
            if unknown_keys:
                raise ValueError(f"maps: unknown keys {sorted(unknown_keys)}; use 'layers', 'images', 'stats'")
            self.maps = {k: None if maps.get(k) is None else {_scalar(v) for v in maps[k]}
                         for k in ("layers", "images", "stats")}
        self._tags: dict = {}
        self._image_ids = None
        self._data = RecorderData(self.bins)
        self._reduced = False  # all_reduce has merged the other processes in

    # ---- configuration -------------------------------------------------------------------
    def set_tags(self, *, image_ids=None, **tags) -> None:
        """Tags for the next forward passes (replacing earlier ones), e.g. timestep=t, dataset="celeba".

        image_ids: (B,) ids of the batch's images (list or tensor), for per_image and maps.
        """
        reserved = set(tags) & _RESERVED
        if reserved:
            raise ValueError(f"tag names {sorted(reserved)} are reserved for output columns")
        self._tags = dict(tags)
        self._data.tag_names.extend(name for name in tags if name not in self._data.tag_names)
        self._image_ids = image_ids

    @property
    def tag_names(self) -> list:
        return list(self._data.tag_names)

    # ---- recording (called by Session) ------------------------------------------------------
    def record(self, layer: str, n_keys: int, grid, values: dict) -> None:
        """Folds one layer call in. values: {stat: (B, H, Nq) float32}; grid: (h, w) of the queries or None."""
        if not values:
            return
        batch, heads = next(iter(values.values())).shape[:2]
        keys = self._element_keys(batch)
        groups: dict = {}
        for e, key in enumerate(keys):
            groups.setdefault(key, []).append(e)
        if grid is not None:
            self._data.grids[layer] = grid
        ids = None
        if self._keeps_images:
            if self._image_ids is None:
                raise ValueError("Recorder(per_image=True, image_histograms=... or maps=...) needs "
                                 "recorder.set_tags(image_ids=...) before each forward pass")
            ids = _per_element(self._image_ids, batch, "image_ids")
        for stat, x in values.items():
            lo, hi = self._data.range_of(layer, stat, n_keys)
            for key, elems in groups.items():
                xs = x if len(elems) == batch else x[torch.as_tensor(elems, device=x.device)]
                self._data.aggregate((key, layer, stat), heads, x.device).add_samples(xs, lo, hi)
            if self.per_image:
                self._data.image_rows.append((keys, ids, layer, stat, x.detach().double().mean(dim=-1)))
            if stat in self.image_histograms:
                counts = element_histograms(x.detach().double(), lo, hi, self.bins)
                for e, image in enumerate(ids):
                    add_counts(self._data.image_hists, (keys[e], image, layer, stat), counts[e])
            if self._keeps_maps_of(layer, stat):
                wanted = self.maps["images"]
                for e, image in enumerate(ids):
                    if wanted is None or image in wanted:
                        add_map(self._data.maps, (keys[e], image, layer, stat), x[e].detach().double(), 1)

    @property
    def _keeps_images(self) -> bool:
        return self.per_image or bool(self.image_histograms) or self.maps is not None

    def _config(self) -> tuple:
        """What two recorders must agree on to be merged."""
        return self.stats, self.bins, self.per_image, self.image_histograms, self.maps is not None

    def _element_keys(self, batch: int) -> list:
        """The tag key (tuple of (name, value)) of each of the batch elements."""
        cols = []
        for name, value in self._tags.items():
            if _is_sequence(value):
                cols.append([(name, v) for v in _per_element(value, batch, f"tag {name!r}")])
            else:
                cols.append([(name, _scalar(value))] * batch)
        return [tuple(c[e] for c in cols) for e in range(batch)]

    def _keeps_maps_of(self, layer: str, stat: str) -> bool:
        m = self.maps
        return m is not None and (m["layers"] is None or layer in m["layers"]) and (
            m["stats"] is None or stat in m["stats"])

    # ---- combining -----------------------------------------------------------------------
    def merge(self, other: "Recorder") -> "Recorder":
        """Adds other's samples into self (as if one recorder had seen both); returns self."""
        if other._config()[:4] != self._config()[:4]:
            raise ValueError("Recorder.merge: recorders differ in stats, bins, per_image or image_histograms")
        self._data.merge(other._data)
        return self

    def all_reduce(self, group=None) -> "Recorder":
        """Merges the recorders of every process of a torch.distributed group into each of them.

        A collective: every process calls it once, after its last forward pass, and each ends
        holding what one recorder would have seen over all processes' passes (see
        ``recorder_distributed``).
        """
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        if self._reduced:
            raise RuntimeError("Recorder.all_reduce was already called: a second call would count the other "
                               "processes' samples twice")
        self._reduced = True
        all_reduce(self._data, self._config(), self._keeps_images, group)
        return self

    def nbytes(self) -> int:
        """Bytes held in tensors (aggregates, per-image means, maps)."""
        return self._data.nbytes()

    # ---- export (see recorder_frames) ------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, layer, head, stat, count, mean, std, m2]; std = sqrt(m2 / (count - 1))."""
        return recorder_frames.aggregate_frame(self._data)

    def histograms(self) -> pd.DataFrame:
        """Columns [*tag_names, layer, head, stat, bin, lo, hi, count]; lo/hi are each bin's edges."""
        return recorder_frames.histogram_frame(self._data)

    def per_image_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, image, layer, head, stat, mean]: mean per-query value of each image
        (averaged over repeated passes with equal tags)."""
        if not self.per_image:
            raise ValueError("per_image_frame needs Recorder(per_image=True)")
        return recorder_frames.per_image_frame(self._data)

    def image_histogram_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, image, layer, stat, bin, count]: each image's histogram over the
        layer's heads (passes with equal tags summed), its nonzero bins only; bins as in
        ``histograms`` (same layer, same stat: same edges)."""
        if not self.image_histograms:
            raise ValueError("image_histogram_frame needs Recorder(image_histograms=[stats])")
        return recorder_frames.image_histogram_frame(self._data)

    def map_tensors(self) -> dict:
        """{(tags, image, layer, stat): float32 tensor (H, h, w)} (or (H, Nq) when the grid is unknown)."""
        return recorder_frames.map_tensors(self._data)

    def maps_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, image, layer, head, stat, query, row, col, value] (row/col -1: grid unknown)."""
        return recorder_frames.maps_frame(self._data)
