"""``all_reduce``: the ``RecorderData`` of every process of a torch.distributed group, merged.

Histograms are summed (all_reduce); counts, means and M2 are all-gathered as one float64 tensor
and merged with Chan's formula in rank order, which stays exact where summing raw power sums
would cancel. Per-image means, histograms and maps (usually of disjoint images) travel as objects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .aggregates import Aggregate, RecorderData, add_counts, add_map


def all_reduce(data: RecorderData, config: tuple, with_images: bool, group=None) -> None:
    """Merges every process's data into data (in place), as if one recorder had seen every pass.

    A collective. config: what every process's recorder must agree on (stats, bins, per_image,
    image_histograms, maps or not); with_images: the recorders keep per-image means, histograms
    or maps.
    """
    world = dist.get_world_size(group)
    layout = _union_layout(data, config, world, group)
    data.aggregates = _reduced_aggregates(data, layout, world, group)
    if with_images:
        _gather_images(data, world, group)


def _reduced_aggregates(data: RecorderData, layout: list, world: int, group) -> dict:
    """{key: Aggregate} over every process, on the device each key's aggregate has here (else CPU)."""
    total = sum(heads for _, heads, _ in layout)
    # an NCCL-only group moves CUDA tensors alone; gloo (and "cpu:gloo,cuda:nccl") takes CPU ones
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    moments = torch.zeros(3, total, dtype=torch.float64)  # count, mean, m2 per (key, head)
    hist = torch.zeros(total, data.bins, dtype=torch.int64)
    for key, heads, offset in layout:
        agg = data.aggregates.get(key)
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
        agg = Aggregate(heads, data.bins, "cpu")
        for part in gathered:
            if int(part[0, offset]):
                agg.add_moments(int(part[0, offset]), part[1, cols], part[2, cols])
        device = data.aggregates[key].mean.device if key in data.aggregates else torch.device("cpu")
        agg.mean, agg.m2, agg.hist = agg.mean.to(device), agg.m2.to(device), hist[cols].clone().to(device)
        merged[key] = agg
    return merged


def _union_layout(data: RecorderData, config: tuple, world: int, group) -> list:
    """[(aggregate key, heads, offset)] over every process's keys (rank order of first
    appearance); also unites tag names, histogram ranges and grids into data."""
    mine = {"config": config, "keys": [(k, a.heads) for k, a in data.aggregates.items()],
            "ranges": data.ranges, "grids": data.grids, "tags": data.tag_names}
    metas = [None] * world
    dist.all_gather_object(metas, mine, group=group)
    heads_of: dict = {}
    for meta in metas:
        if meta["config"] != config:
            raise ValueError("Recorder.all_reduce: processes' recorders differ in stats, bins, per_image, "
                             "image_histograms or maps")
        data.unite_layout(meta["ranges"], meta["grids"], meta["tags"], "Recorder.all_reduce")
        for key, heads in meta["keys"]:
            heads_of.setdefault(key, heads)
    layout, offset = [], 0
    for key, heads in heads_of.items():
        layout.append((key, heads, offset))
        offset += heads
    return layout


def _gather_images(data: RecorderData, world: int, group) -> None:
    """Per-image means, histograms and maps of every process, in rank order."""
    mine = ([(keys, ids, layer, stat, means.cpu()) for keys, ids, layer, stat, means in data.image_rows],
            {k: c.cpu() for k, c in data.image_hists.items()},
            {k: (s.cpu(), n) for k, (s, n) in data.maps.items()})
    parts = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    data.image_rows, data.image_hists, data.maps = [], {}, {}
    for rows, hists, maps in parts:
        data.image_rows.extend(rows)
        for key, counts in hists.items():
            add_counts(data.image_hists, key, counts)
        for key, (total, count) in maps.items():
            add_map(data.maps, key, total, count)
