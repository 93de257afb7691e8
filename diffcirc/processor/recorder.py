"""``Recorder``: streaming per-(layer, head) aggregates of per-query attention statistics.

Each forward pass inside ``session.trace(recorder)`` hands the recorder, per layer, tensors
(B, H, Nq) of per-query values (entropy in nats, attention distance in [0, sqrt 2], same-label
mass in [0, 1]; see DESIGN.md). The recorder folds them into aggregates keyed by the current
tags (``set_tags``), the layer and the statistic:

- count, mean, M2 per head (Welford / Chan: merging two recorders is exact);
- a fixed-bin histogram per head: entropy over [0, ln Nk] (Nk = number of keys the layer had
  when first seen), distance over [0, sqrt 2], label_mass over [0, 1]; values outside land in
  the end bins.

One sample is one query of one image, so ``mean`` is the mean per-query value. Memory is
O(tag combinations x layers x heads x bins) whatever the number of images; only the two
explicitly requested extras grow with images: ``per_image`` (one mean per image, layer, head,
stat) and ``maps`` (full per-query maps for chosen layers and images).

Tags are set before a forward pass and stay until the next ``set_tags``. A tag value is a
scalar (same for the whole batch) or a sequence with one value per batch element (e.g. the
condition of each element of a ``run_conditions`` batch); a sequence shorter than the batch is
tiled (element e takes value e % len), as are ``image_ids``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
import torch

RECORDABLE = ("entropy", "distance", "label_mass")
_RESERVED = {"layer", "head", "stat", "image", "bin", "lo", "hi", "count", "mean", "std", "m2", "query", "row", "col",
             "value"}


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _per_element(values, batch: int, what: str) -> list:
    """A list of batch Python scalars from a sequence or tensor whose length divides batch."""
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    values = [_scalar(v) for v in values]
    if not values or batch % len(values):
        raise ValueError(f"{what}: {len(values)} values for a forward batch of {batch} (need equal or a divisor)")
    return [values[e % len(values)] for e in range(batch)]


class _Aggregate:
    """count, mean (H,), m2 (H,) float64 and hist (H, bins) int64 of one (tags, layer, stat)."""

    __slots__ = ("count", "mean", "m2", "hist")

    def __init__(self, heads: int, bins: int, device):
        self.count = 0
        self.mean = torch.zeros(heads, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(heads, dtype=torch.float64, device=device)
        self.hist = torch.zeros(heads, bins, dtype=torch.int64, device=device)

    def merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor, hist_b: torch.Tensor):
        # Chan et al.'s pairwise update: exact for any split of the samples.
        n_a = self.count
        n = n_a + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b.to(self.m2.device) + delta * delta * (n_a * n_b / n)
        self.hist += hist_b.to(self.hist.device)
        self.count = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.m2, self.hist))


class Recorder:
    """Streams per-query statistics into per-(tags, layer, head, stat) aggregates.

    Args:
        stats: subset of ("entropy", "distance", "label_mass"). label_mass is recorded only for
            self-attention in a trace given labels; distance only for self-attention; cross-
            attention layers record entropy alone.
        bins: histogram bins per (layer, head, stat).
        per_image: also keep one mean per (tags, image, layer, head, stat); needs image_ids.
        maps: None, or {"layers": [names] | None (all), "images": [ids] | None (all),
            "stats": [names] | None (all recorded)}: keep per-query maps; needs image_ids.
    """

    def __init__(self, stats=RECORDABLE, bins: int = 64, per_image: bool = False, maps: Optional[dict] = None):
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        unknown = set(stats) - set(RECORDABLE)
        if unknown or not stats:
            raise ValueError(f"Recorder stats must be a non-empty subset of {RECORDABLE}, got {stats}")
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
            as_set = lambda x: None if x is None else {_scalar(v) for v in x}  # noqa: E731
            self.maps = {k: as_set(maps.get(k)) for k in ("layers", "images", "stats")}
        self._tags: dict = {}
        self._image_ids = None
        self._tag_names: list = []
        self._agg: dict = {}  # (tag_key, layer, stat) -> _Aggregate
        self._ranges: dict = {}  # (layer, stat) -> (lo, hi)
        self._grids: dict = {}  # layer -> (h, w) or None
        self._image_rows: list = []  # (tag_keys per element, ids, layer, stat, means (b, H))
        self._maps: dict = {}  # (tag_key, image, layer, stat) -> [sum (H, N) float64, count]
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
        self._tag_names.extend(name for name in tags if name not in self._tag_names)
        self._image_ids = image_ids

    @property
    def tag_names(self) -> list:
        return list(self._tag_names)

    # ---- recording (called by Session) ------------------------------------------------------
    def record(self, layer: str, n_keys: int, grid, values: dict) -> None:
        """Folds one layer call in. values: {stat: (B, H, Nq) float32}; grid: (h, w) of the queries or None."""
        if not values:
            return
        some = next(iter(values.values()))
        batch, heads = some.shape[:2]
        keys = self._element_keys(batch)
        groups: dict = {}
        for e, key in enumerate(keys):
            groups.setdefault(key, []).append(e)
        if grid is not None:
            self._grids[layer] = grid
        ids = None
        if self.per_image or self.maps is not None:
            if self._image_ids is None:
                raise ValueError("Recorder(per_image=True or maps=...) needs recorder.set_tags(image_ids=...) "
                                 "before each forward pass")
            ids = _per_element(self._image_ids, batch, "image_ids")
        for stat, x in values.items():
            lo, hi = self._ranges.setdefault((layer, stat), self._range(stat, n_keys))
            for key, elems in groups.items():
                xs = x if len(elems) == batch else x[torch.as_tensor(elems, device=x.device)]
                self._update(key, layer, stat, xs, lo, hi)
            if self.per_image:
                self._image_rows.append((keys, ids, layer, stat, x.detach().double().mean(dim=-1)))
            if self.maps is not None:
                self._keep_maps(keys, ids, layer, stat, x)

    def _element_keys(self, batch: int) -> list:
        cols = []
        for name, value in self._tags.items():
            if isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, torch.Tensor) and value.dim() > 0):
                cols.append([(name, v) for v in _per_element(value, batch, f"tag {name!r}")])
            else:
                cols.append([(name, _scalar(value))] * batch)
        return [tuple(c[e] for c in cols) for e in range(batch)]

    def _range(self, stat: str, n_keys: int) -> tuple:
        if stat == "entropy":
            return 0.0, math.log(max(n_keys, 2))
        if stat == "distance":
            return 0.0, math.sqrt(2.0)
        return 0.0, 1.0

    def _update(self, key, layer: str, stat: str, xs: torch.Tensor, lo: float, hi: float) -> None:
        b, heads, nq = xs.shape
        xd = xs.detach().double()
        mean_b = xd.mean(dim=(0, 2))
        m2_b = ((xd - mean_b[None, :, None]) ** 2).sum(dim=(0, 2))
        idx = ((xd - lo) * (self.bins / (hi - lo))).floor().clamp_(0, self.bins - 1).long()
        idx += torch.arange(heads, device=xs.device)[None, :, None] * self.bins
        # index_add_, not bincount: bincount reads min/max back to the host (two syncs per call on CUDA),
        # and idx is already clamped into range
        hist_b = torch.zeros(heads * self.bins, dtype=torch.int64, device=xs.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.int64, device=xs.device)).view(heads, self.bins)
        agg = self._agg.get((key, layer, stat))
        if agg is None:
            agg = self._agg[(key, layer, stat)] = _Aggregate(heads, self.bins, xs.device)
        agg.merge(b * nq, mean_b, m2_b, hist_b)

    def _keep_maps(self, keys, ids, layer, stat, x) -> None:
        m = self.maps
        if (m["layers"] is not None and layer not in m["layers"]) or (m["stats"] is not None and stat not in m["stats"]):
            return
        for e, image in enumerate(ids):
            if m["images"] is not None and image not in m["images"]:
                continue
            slot = self._maps.setdefault((keys[e], image, layer, stat), [0.0, 0])
            slot[0] = slot[0] + x[e].detach().double()
            slot[1] += 1

    # ---- combining -----------------------------------------------------------------------
    def merge(self, other: "Recorder") -> "Recorder":
        """Adds other's samples into self (as if one recorder had seen both); returns self."""
        if (other.stats, other.bins, other.per_image) != (self.stats, self.bins, self.per_image):
            raise ValueError("Recorder.merge: recorders differ in stats, bins or per_image")
        for k, rng in other._ranges.items():
            if self._ranges.setdefault(k, rng) != rng:
                raise ValueError(f"Recorder.merge: histogram range of {k} differs ({self._ranges[k]} vs {rng})")
        for name in other._tag_names:
            if name not in self._tag_names:
                self._tag_names.append(name)
        for layer, grid in other._grids.items():
            self._grids.setdefault(layer, grid)
        for k, agg in other._agg.items():
            mine = self._agg.get(k)
            if mine is None:
                mine = self._agg[k] = _Aggregate(agg.mean.numel(), self.bins, agg.mean.device)
            mine.merge(agg.count, agg.mean, agg.m2, agg.hist)
        self._image_rows.extend(other._image_rows)
        for k, (s, n) in other._maps.items():
            slot = self._maps.setdefault(k, [0.0, 0])
            slot[0] = slot[0] + s
            slot[1] += n
        return self

    def all_reduce(self, group=None) -> "Recorder":
        """Merges the recorders of every process of a torch.distributed group into each of them.

        A collective: every process calls it once, after its last forward pass, and each ends
        holding what one recorder would have seen over all processes' passes. Histograms are
        summed (all_reduce); counts, means and M2 are all-gathered as one float64 tensor and
        merged with Chan's formula in rank order, which stays exact where summing raw power sums
        would cancel. Per-image means and maps (usually of disjoint images) travel as objects.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        if self._reduced:
            raise RuntimeError("Recorder.all_reduce was already called: a second call would count the other "
                               "processes' samples twice")
        self._reduced = True
        world = dist.get_world_size(group)
        layout = self._union_layout(world, group)
        total = sum(heads for _, heads, _ in layout)
        # an NCCL-only group moves CUDA tensors alone; gloo (and "cpu:gloo,cuda:nccl") takes CPU ones
        wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        moments = torch.zeros(3, total, dtype=torch.float64)  # count, mean, m2 per (key, head)
        hist = torch.zeros(total, self.bins, dtype=torch.int64)
        for key, heads, offset in layout:
            agg = self._agg.get(key)
            if agg is not None:
                cols = slice(offset, offset + heads)
                moments[0, cols] = agg.count
                moments[1, cols], moments[2, cols] = agg.mean.cpu(), agg.m2.cpu()
                hist[cols] = agg.hist.cpu()
        if wire is not None:
            moments, hist = moments.to(wire), hist.to(wire)
        gathered = [torch.empty_like(moments) for _ in range(world)]
        dist.all_gather(gathered, moments, group=group)
        dist.all_reduce(hist, group=group)
        gathered, hist = [g.cpu() for g in gathered], hist.cpu()
        merged = {}
        for key, heads, offset in layout:
            cols = slice(offset, offset + heads)
            device = self._agg[key].mean.device if key in self._agg else torch.device("cpu")
            agg = _Aggregate(heads, self.bins, "cpu")
            no_hist = torch.zeros(heads, self.bins, dtype=torch.int64)
            for part in gathered:
                if int(part[0, offset]):
                    agg.merge(int(part[0, offset]), part[1, cols], part[2, cols], no_hist)
            agg.hist = hist[cols].clone()
            agg.mean, agg.m2, agg.hist = agg.mean.to(device), agg.m2.to(device), agg.hist.to(device)
            merged[key] = agg
        self._agg = merged
        self._gather_images(world, group)
        return self

    def _union_layout(self, world: int, group) -> list:
        """[(aggregate key, heads, offset)] over every process's keys (rank order of first
        appearance); also unites tag names, histogram ranges and grids."""
        import torch.distributed as dist

        mine = {"config": (self.stats, self.bins, self.per_image, self.maps is not None), "keys": [(k, a.mean.numel()) for k, a in self._agg.items()],
                "ranges": self._ranges, "grids": self._grids, "tags": self._tag_names}
        metas = [None] * world
        dist.all_gather_object(metas, mine, group=group)
        heads_of: dict = {}
        for meta in metas:
            if meta["config"] != mine["config"]:
                raise ValueError("Recorder.all_reduce: processes' recorders differ in stats, bins, per_image or maps")
            for k, rng in meta["ranges"].items():
                if self._ranges.setdefault(k, rng) != rng:
                    raise ValueError(f"Recorder.all_reduce: histogram range of {k} differs ({self._ranges[k]} vs {rng})")
            for layer, grid in meta["grids"].items():
                self._grids.setdefault(layer, grid)
            self._tag_names.extend(n for n in meta["tags"] if n not in self._tag_names)
            for key, heads in meta["keys"]:
                heads_of.setdefault(key, heads)
        layout, offset = [], 0
        for key, heads in heads_of.items():
            layout.append((key, heads, offset))
            offset += heads
        return layout

    def _gather_images(self, world: int, group) -> None:
        """Per-image means and maps of every process, in rank order."""
        import torch.distributed as dist

        if not self.per_image and self.maps is None:
            return
        mine = ([(k, ids, layer, stat, m.cpu()) for k, ids, layer, stat, m in self._image_rows],
                {k: (s.cpu() if isinstance(s, torch.Tensor) else s, n) for k, (s, n) in self._maps.items()})
        parts = [None] * world
        dist.all_gather_object(parts, mine, group=group)
        self._image_rows, self._maps = [], {}
        for rows, maps in parts:
            self._image_rows.extend(rows)
            for k, (s, n) in maps.items():
                slot = self._maps.setdefault(k, [0.0, 0])
                slot[0] = slot[0] + s
                slot[1] += n

    def nbytes(self) -> int:
        """Bytes held in tensors (aggregates, per-image means, maps)."""
        total = sum(a.nbytes() for a in self._agg.values())
        total += sum(r[4].numel() * r[4].element_size() for r in self._image_rows)
        total += sum(s.numel() * s.element_size() for s, _ in self._maps.values())
        return total

    # ---- export --------------------------------------------------------------------------
    def _tag_columns(self, key) -> dict:
        d = dict(key)
        return {name: d.get(name) for name in self._tag_names}

    def to_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, layer, head, stat, count, mean, std, m2]; std = sqrt(m2 / (count - 1))."""
        rows = []
        for (key, layer, stat), agg in self._agg.items():
            tags = self._tag_columns(key)
            mean, m2 = agg.mean.cpu().numpy(), agg.m2.cpu().numpy()
            std = np.sqrt(m2 / (agg.count - 1)) if agg.count > 1 else np.full_like(m2, np.nan)
            for h in range(mean.shape[0]):
                rows.append({**tags, "layer": layer, "head": h, "stat": stat, "count": agg.count,
                             "mean": mean[h], "std": std[h], "m2": m2[h]})
        cols = [*self._tag_names, "layer", "head", "stat", "count", "mean", "std", "m2"]
        return pd.DataFrame(rows, columns=cols)

    def histograms(self) -> pd.DataFrame:
        """Columns [*tag_names, layer, head, stat, bin, lo, hi, count]; lo/hi are each bin's edges."""
        frames = []
        for (key, layer, stat), agg in self._agg.items():
            lo, hi = self._ranges[(layer, stat)]
            edges = np.linspace(lo, hi, self.bins + 1)
            heads = agg.hist.shape[0]
            f = pd.DataFrame({
                "layer": layer,
                "head": np.repeat(np.arange(heads), self.bins),
                "stat": stat,
                "bin": np.tile(np.arange(self.bins), heads),
                "lo": np.tile(edges[:-1], heads),
                "hi": np.tile(edges[1:], heads),
                "count": agg.hist.cpu().numpy().reshape(-1),
            })
            for name, value in self._tag_columns(key).items():
                f[name] = value
            frames.append(f)
        cols = [*self._tag_names, "layer", "head", "stat", "bin", "lo", "hi", "count"]
        if not frames:
            return pd.DataFrame(columns=cols)
        return pd.concat(frames, ignore_index=True)[cols]

    def per_image_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, image, layer, head, stat, mean]: mean per-query value of each image
        (averaged over repeated passes with equal tags)."""
        if not self.per_image:
            raise ValueError("per_image_frame needs Recorder(per_image=True)")
        cols = [*self._tag_names, "image", "layer", "head", "stat", "mean"]
        rows = []
        for keys, ids, layer, stat, means in self._image_rows:
            means = means.cpu().numpy()
            for e, image in enumerate(ids):
                tags = self._tag_columns(keys[e])
                for h in range(means.shape[1]):
                    rows.append({**tags, "image": image, "layer": layer, "head": h, "stat": stat, "mean": means[e, h]})
        frame = pd.DataFrame(rows, columns=cols)
        if frame.empty:
            return frame
        return frame.groupby(cols[:-1], sort=False, dropna=False)["mean"].mean().reset_index()

    def map_tensors(self) -> dict:
        """{(tags, image, layer, stat): float32 tensor (H, h, w)} (or (H, Nq) when the grid is unknown).

        tags is a tuple of (name, value) pairs; each map is the mean over passes with equal keys.
        """
        out = {}
        for (key, image, layer, stat), (s, n) in self._maps.items():
            m = (s / n).float().cpu()
            grid = self._grids.get(layer)
            if grid is not None and grid[0] * grid[1] == m.shape[-1]:
                m = m.view(m.shape[0], *grid)
            out[(key, image, layer, stat)] = m
        return out

    def maps_frame(self) -> pd.DataFrame:
        """Columns [*tag_names, image, layer, head, stat, query, row, col, value] (row/col: -1 when the grid is unknown)."""
        cols = [*self._tag_names, "image", "layer", "head", "stat", "query", "row", "col", "value"]
        frames = []
        for (key, image, layer, stat), (s, n) in self._maps.items():
            m = (s / n).float().cpu().numpy()
            heads, nq = m.shape
            grid = self._grids.get(layer)
            q = np.arange(nq)
            r, c = (q // grid[1], q % grid[1]) if grid is not None and grid[0] * grid[1] == nq else (q * 0 - 1, q * 0 - 1)
            f = pd.DataFrame({"image": image, "layer": layer, "head": np.repeat(np.arange(heads), nq), "stat": stat,
                              "query": np.tile(q, heads), "row": np.tile(r, heads), "col": np.tile(c, heads),
                              "value": m.reshape(-1)})
            for name, value in self._tag_columns(key).items():
                f[name] = value
            frames.append(f)
        if not frames:
            return pd.DataFrame(columns=cols)
        return pd.concat(frames, ignore_index=True)[cols]
