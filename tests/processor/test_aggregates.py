"""aggregates: histogram ranges and bin edges by hand, Chan merges against numpy (also far from
zero, where raw power sums cancel), map sums that never alias, and RecorderData.merge's checks."""

import math

import numpy as np
import pytest
import torch

from diffcirc.processor.aggregates import Aggregate, RecorderData, add_map, histogram, stat_range


def test_stat_ranges():
    assert stat_range("entropy", 77) == (0.0, math.log(77))
    assert stat_range("entropy", 1) == (0.0, math.log(2))  # one key: a zero-width range would divide by 0
    assert stat_range("distance", 77) == (0.0, math.sqrt(2))
    assert stat_range("label_mass", 77) == (0.0, 1.0)


def test_histogram_bins_by_hand_with_outliers_in_the_end_bins():
    x = torch.tensor([[[-0.1, 0.0, 0.24, 0.25, 0.5, 0.99, 1.0, 1.3]],
                      [[0.3, 0.3, 0.3, 0.3, 0.8, 0.8, 0.8, 0.8]]], dtype=torch.float64)  # (B=2, H=1, Nq=8)
    assert histogram(x, 0.0, 1.0, 4).tolist() == [[3, 5, 1, 7]]
    per_head = x.reshape(1, 2, 8)  # the same values as two heads of one image
    assert histogram(per_head, 0.0, 1.0, 4).tolist() == [[3, 1, 1, 3], [0, 4, 0, 4]]


def test_chan_merge_of_unequal_parts_far_from_zero_equals_numpy():
    g = torch.Generator().manual_seed(2)
    parts = [torch.rand(b, 2, 5, generator=g, dtype=torch.float64) * 1e-3 + 1e6 for b in (1, 7, 2)]
    agg = Aggregate(2, 3, "cpu")
    for x in parts[:2]:
        agg.add_samples(x, 0.0, 1.0)
    other = Aggregate(2, 3, "cpu")
    other.add_samples(parts[2], 0.0, 1.0)
    agg.add(other)
    for h in range(2):
        values = torch.cat([x[:, h].reshape(-1) for x in parts]).numpy()
        m2 = ((values - values.mean()) ** 2).sum()
        assert agg.count == values.size == 50
        assert agg.mean[h].item() == pytest.approx(values.mean(), rel=1e-14)
        assert agg.m2[h].item() == pytest.approx(m2, rel=1e-5)  # sum(x^2) - n mean^2 would lose every digit here
    assert agg.hist.tolist() == [[0, 0, 50], [0, 0, 50]]


def test_add_map_sums_and_counts_without_touching_its_inputs():
    maps = {}
    first, second = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 2.0, dtype=torch.float64)
    add_map(maps, "k", first, 1)
    add_map(maps, "k", second, 2)
    total, count = maps["k"]
    assert count == 3 and total.tolist() == [[3.0] * 3] * 2
    assert first.tolist() == [[1.0] * 3] * 2 and second.tolist() == [[2.0] * 3] * 2


def test_recorder_data_merge_unites_layout_and_refuses_other_ranges():
    a = RecorderData(4, tag_names=["timestep"], grids={"l0": (2, 2)})
    b = RecorderData(4, tag_names=["dataset", "timestep"])
    a.range_of("l0", "entropy", 10)
    b.range_of("l1", "entropy", 20)
    b.grids["l1"] = (4, 5)
    a.merge(b)
    assert a.tag_names == ["timestep", "dataset"] and a.grids == {"l0": (2, 2), "l1": (4, 5)}
    assert a.ranges == {("l0", "entropy"): (0.0, math.log(10)), ("l1", "entropy"): (0.0, math.log(20))}
    c = RecorderData(4)
    c.range_of("l0", "entropy", 11)
    with pytest.raises(ValueError, match="histogram range of"):
        a.merge(c)


def test_merge_adds_aggregates_key_by_key():
    a, b = RecorderData(2), RecorderData(2)
    x = np.array([[[0.1, 0.2, 0.9]]])
    y = np.array([[[0.7]], [[0.8]]])
    a.aggregate("k", 1, "cpu").add_samples(torch.tensor(x), 0.0, 1.0)
    b.aggregate("k", 1, "cpu").add_samples(torch.tensor(y), 0.0, 1.0)
    b.aggregate("only b", 1, "cpu").add_samples(torch.tensor(y), 0.0, 1.0)
    a.merge(b)
    merged = a.aggregates["k"]
    assert merged.count == 5 and merged.hist.tolist() == [[2, 3]]
    assert merged.mean.item() == pytest.approx(0.54, abs=1e-15)  # (0.1 + 0.2 + 0.9 + 0.7 + 0.8) / 5
    assert merged.m2.item() == pytest.approx(0.532, abs=1e-14)  # sum of squared deviations from 0.54
    assert a.aggregates["only b"].count == 2


def test_nbytes_counts_every_tensor_by_hand():
    # one aggregate of 3 heads and 5 bins: mean and m2 are 3 float64 each, hist 3 x 5 int64 = 21 * 8 bytes;
    # a per-image row (2, 3) float64 and a map (3, 4) float64 add 6 * 8 and 12 * 8
    data = RecorderData(5)
    data.aggregate("k", 3, "cpu")
    assert data.aggregates["k"].nbytes() == 168
    data.image_rows.append(((), [0, 1], "l0", "entropy", torch.zeros(2, 3, dtype=torch.float64)))
    add_map(data.maps, "m", torch.zeros(3, 4, dtype=torch.float64), 1)
    assert data.nbytes() == 168 + 48 + 96
