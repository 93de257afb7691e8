"""Tidy exports of a ``RecorderData``: aggregates, histograms, per-image means and histograms, and
per-query maps.

Every frame starts with one column per tag name (missing where a row's passes lacked that tag).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .aggregates import RecorderData


def _tag_columns(data: RecorderData, key) -> dict:
    d = dict(key)
    return {name: d.get(name) for name in data.tag_names}


def _concat(frames: list, cols: list) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols]


def aggregate_frame(data: RecorderData) -> pd.DataFrame:
    """Columns [*tag_names, layer, head, stat, count, mean, std, m2]; std = sqrt(m2 / (count - 1))."""
    rows = []
    for (key, layer, stat), agg in data.aggregates.items():
        tags = _tag_columns(data, key)
        mean, m2 = agg.mean.cpu().numpy(), agg.m2.cpu().numpy()
        std = np.sqrt(m2 / (agg.count - 1)) if agg.count > 1 else np.full_like(m2, np.nan)
        for h in range(mean.shape[0]):
            rows.append({**tags, "layer": layer, "head": h, "stat": stat, "count": agg.count,
                         "mean": mean[h], "std": std[h], "m2": m2[h]})
    cols = [*data.tag_names, "layer", "head", "stat", "count", "mean", "std", "m2"]
    return pd.DataFrame(rows, columns=cols)


def histogram_frame(data: RecorderData) -> pd.DataFrame:
    """Columns [*tag_names, layer, head, stat, bin, lo, hi, count]; lo/hi are each bin's edges."""
    frames = []
    for (key, layer, stat), agg in data.aggregates.items():
        lo, hi = data.ranges[(layer, stat)]
        edges = np.linspace(lo, hi, data.bins + 1)
        heads = agg.heads
        f = pd.DataFrame({
            "layer": layer,
            "head": np.repeat(np.arange(heads), data.bins),
            "stat": stat,
            "bin": np.tile(np.arange(data.bins), heads),
            "lo": np.tile(edges[:-1], heads),
            "hi": np.tile(edges[1:], heads),
            "count": agg.hist.cpu().numpy().reshape(-1),
        })
        for name, value in _tag_columns(data, key).items():
            f[name] = value
        frames.append(f)
    return _concat(frames, [*data.tag_names, "layer", "head", "stat", "bin", "lo", "hi", "count"])


def per_image_frame(data: RecorderData) -> pd.DataFrame:
    """Columns [*tag_names, image, layer, head, stat, mean]: mean per-query value of each image
    (averaged over repeated passes with equal tags)."""
    cols = [*data.tag_names, "image", "layer", "head", "stat", "mean"]
    rows = []
    for keys, ids, layer, stat, means in data.image_rows:
        means = means.cpu().numpy()
        for e, image in enumerate(ids):
            tags = _tag_columns(data, keys[e])
            for h in range(means.shape[1]):
                rows.append({**tags, "image": image, "layer": layer, "head": h, "stat": stat, "mean": means[e, h]})
    frame = pd.DataFrame(rows, columns=cols)
    if frame.empty:
        return frame
    return frame.groupby(cols[:-1], sort=False, dropna=False)["mean"].mean().reset_index()


def image_histogram_frame(data: RecorderData) -> pd.DataFrame:
    """Columns [*tag_names, image, layer, stat, bin, count]: the nonzero bins of each image's
    histogram over a layer's heads (the histograms are sparse: storing zeros would multiply the
    table by the bins a query's entropy never reaches)."""
    cols = [*data.tag_names, "image", "layer", "stat", "bin", "count"]
    frames = []
    for (key, image, layer, stat), counts in data.image_hists.items():
        counts = counts.cpu().numpy()
        nonzero = np.flatnonzero(counts)
        f = pd.DataFrame({"image": image, "layer": layer, "stat": stat, "bin": nonzero, "count": counts[nonzero]})
        for name, value in _tag_columns(data, key).items():
            f[name] = value
        frames.append(f)
    return _concat(frames, cols)


def _grid_of(data: RecorderData, layer: str, n_queries: int):
    """(h, w) of layer when known and matching n_queries, else None."""
    grid = data.grids.get(layer)
    return grid if grid is not None and grid[0] * grid[1] == n_queries else None


def map_tensors(data: RecorderData) -> dict:
    """{(tags, image, layer, stat): float32 tensor (H, h, w)} (or (H, Nq) when the grid is unknown).

    tags is a tuple of (name, value) pairs; each map is the mean over passes with equal keys.
    """
    out = {}
    for (key, image, layer, stat), (total, count) in data.maps.items():
        m = (total / count).float().cpu()
        grid = _grid_of(data, layer, m.shape[-1])
        out[(key, image, layer, stat)] = m if grid is None else m.view(m.shape[0], *grid)
    return out


def maps_frame(data: RecorderData) -> pd.DataFrame:
    """Columns [*tag_names, image, layer, head, stat, query, row, col, value] (row/col: -1 when the grid is unknown)."""
    frames = []
    for (key, image, layer, stat), (total, count) in data.maps.items():
        m = (total / count).float().cpu().numpy()
        heads, nq = m.shape
        grid = _grid_of(data, layer, nq)
        q = np.arange(nq)
        r, c = (q // grid[1], q % grid[1]) if grid is not None else (np.full(nq, -1), np.full(nq, -1))
        f = pd.DataFrame({"image": image, "layer": layer, "head": np.repeat(np.arange(heads), nq), "stat": stat,
                          "query": np.tile(q, heads), "row": np.tile(r, heads), "col": np.tile(c, heads),
                          "value": m.reshape(-1)})
        for name, value in _tag_columns(data, key).items():
            f[name] = value
        frames.append(f)
    return _concat(frames, [*data.tag_names, "image", "layer", "head", "stat", "query", "row", "col", "value"])
