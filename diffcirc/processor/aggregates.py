"""Streaming aggregates of per-query statistics and everything a ``Recorder`` accumulates.

- ``Aggregate``: count, mean, M2 per head (Welford / Chan: merging is exact for any split of
  the samples) and a fixed-bin histogram per head, of one (tags, layer, statistic).
- ``stat_range``: the histogram range of each statistic: entropy over [0, ln Nk], distance over
  [0, sqrt 2], label_mass over [0, 1]; values outside land in the end bins.
- ``add_map``: the one running sum of per-query maps, used by recording, merge and all_reduce;
  ``add_counts`` the same for per-image histograms (``element_histograms``: heads together).
- ``RecorderData``: the aggregates with their ranges, grids, tag names, per-image means and
  maps; ``merge`` unites two of them as if one had seen both sets of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

RECORDABLE = ("entropy", "distance", "label_mass")


def stat_range(stat: str, n_keys: int) -> tuple:
    """(lo, hi) of the histogram of stat in a layer with n_keys keys (entropy is at most ln Nk)."""
    if stat == "entropy":
        return 0.0, math.log(max(n_keys, 2))
    if stat == "distance":
        return 0.0, math.sqrt(2.0)
    return 0.0, 1.0


def _grouped_counts(x: torch.Tensor, lo: float, hi: float, bins: int, groups: int, group_of: torch.Tensor) -> torch.Tensor:
    """(groups, bins) int64 counts of x in equal bins of [lo, hi], each value counted in its group
    group_of (broadcast to x's shape).

    Value v falls in bin floor((v - lo) * bins / (hi - lo)), clamped to [0, bins - 1].
    """
    idx = ((x - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()
    idx += group_of * bins
    # index_add_, not bincount: bincount reads min/max back to the host (two syncs per call on CUDA),
    # and idx is already clamped into range
    counts = torch.zeros(groups * bins, dtype=torch.int64, device=x.device)
    counts.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.int64, device=x.device))
    return counts.view(groups, bins)


def histogram(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """(H, bins) int64 counts of x (B, H, Nq) float64 in equal bins of [lo, hi], per head (the bins of
    ``_grouped_counts``)."""
    heads = x.shape[1]
    return _grouped_counts(x, lo, hi, bins, heads, torch.arange(heads, device=x.device)[None, :, None])


def element_histograms(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """(B, bins) int64 counts of x (B, H, Nq) per batch element, its heads' queries together, in
    the bins of ``histogram``."""
    batch = x.shape[0]
    return _grouped_counts(x, lo, hi, bins, batch, torch.arange(batch, device=x.device)[:, None, None])


def add_counts(hists: dict, key, counts: torch.Tensor) -> None:
    """hists[key] += counts (bins,) int64: the one running sum of per-image histograms."""
    slot = hists.get(key)
    hists[key] = counts if slot is None else slot + counts.to(slot.device)


class Aggregate:
    """count, mean (H,), m2 (H,) float64 and hist (H, bins) int64 of one (tags, layer, stat)."""

    __slots__ = ("count", "mean", "m2", "hist")

    def __init__(self, heads: int, bins: int, device):
        self.count = 0
        self.mean = torch.zeros(heads, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(heads, dtype=torch.float64, device=device)
        self.hist = torch.zeros(heads, bins, dtype=torch.int64, device=device)

    @property
    def heads(self) -> int:
        return self.mean.numel()

    def add_samples(self, x: torch.Tensor, lo: float, hi: float) -> None:
        """Folds in x (B, H, Nq): B * Nq samples per head, histogrammed over [lo, hi]."""
        xd = x.detach().double()
        mean = xd.mean(dim=(0, 2))
        m2 = ((xd - mean[None, :, None]) ** 2).sum(dim=(0, 2))
        self.add_moments(xd.shape[0] * xd.shape[2], mean, m2)
        self.hist += histogram(xd, lo, hi, self.hist.shape[1])

    def add_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise update with n_b samples of mean mean_b (H,) and M2 m2_b (H,)."""
        n_a = self.count
        n = n_a + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b.to(self.m2.device) + delta * delta * (n_a * n_b / n)
        self.count = n

    def add(self, other: "Aggregate") -> None:
        self.add_moments(other.count, other.mean, other.m2)
        self.hist += other.hist.to(self.hist.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.m2, self.hist))


def add_map(maps: dict, key, total: torch.Tensor, count: int) -> None:
    """maps[key] += (total, count): the sum (H, Nq) float64 of count passes' maps of one key.

    Tuples, never in-place sums, so a slot never aliases a tensor another recorder still holds.
    """
    slot = maps.get(key)
    maps[key] = (total, count) if slot is None else (slot[0] + total, slot[1] + count)


@dataclass
class RecorderData:
    """What a Recorder has accumulated.

    aggregates: {(tag key, layer, stat): Aggregate}, a tag key being a tuple of (name, value);
    ranges: {(layer, stat): (lo, hi)} of the histograms, fixed when first seen;
    grids: {layer: (h, w)} of the queries; tag_names: in order of first use;
    image_rows: [(tag key per element, image id per element, layer, stat, means (b, H) float64)];
    image_hists: {(tag key, image, layer, stat): counts (bins,) int64 of the image's queries over
    every head of the layer, in the layer's histogram range};
    maps: {(tag key, image, layer, stat): (sum (H, Nq) float64, passes)}.
    """

    bins: int
    aggregates: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    tag_names: list = field(default_factory=list)
    image_rows: list = field(default_factory=list)
    image_hists: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)

    def range_of(self, layer: str, stat: str, n_keys: int) -> tuple:
        return self.ranges.setdefault((layer, stat), stat_range(stat, n_keys))

    def aggregate(self, key, heads: int, device) -> Aggregate:
        agg = self.aggregates.get(key)
        if agg is None:
            agg = self.aggregates[key] = Aggregate(heads, self.bins, device)
        return agg

    def unite_layout(self, ranges: dict, grids: dict, tag_names: list, what: str) -> None:
        """Takes in another recorder's histogram ranges (which must agree), grids and tag names."""
        for k, rng in ranges.items():
            if self.ranges.setdefault(k, rng) != rng:
                raise ValueError(f"{what}: histogram range of {k} differs ({self.ranges[k]} vs {rng})")
        for layer, grid in grids.items():
            self.grids.setdefault(layer, grid)
        self.tag_names.extend(name for name in tag_names if name not in self.tag_names)

    def merge(self, other: "RecorderData") -> None:
        """Adds other's samples into self, as if one recorder had seen both."""
        self.unite_layout(other.ranges, other.grids, other.tag_names, "Recorder.merge")
        for key, agg in other.aggregates.items():
            self.aggregate(key, agg.heads, agg.mean.device).add(agg)
        self.image_rows.extend(other.image_rows)
        for key, counts in other.image_hists.items():
            add_counts(self.image_hists, key, counts)
        for key, (total, count) in other.maps.items():
            add_map(self.maps, key, total, count)

    def nbytes(self) -> int:
        """Bytes held in tensors (aggregates, per-image means, maps)."""
        total = sum(a.nbytes() for a in self.aggregates.values())
        total += sum(row[4].numel() * row[4].element_size() for row in self.image_rows)
        total += sum(c.numel() * c.element_size() for c in self.image_hists.values())
        total += sum(s.numel() * s.element_size() for s, _ in self.maps.values())
        return total
