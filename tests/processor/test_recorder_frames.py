"""recorder_frames on hand-built RecorderData: tag columns, std of a single sample, bin edges,
per-image means over repeated passes, and map layouts with and without a matching grid."""

import math

import numpy as np
import pandas as pd
import torch

from diffcirc.processor.aggregates import RecorderData, add_map
from diffcirc.processor.recorder_frames import (aggregate_frame, histogram_frame, map_tensors, maps_frame,
                                                per_image_frame)


def _data() -> RecorderData:
    data = RecorderData(2, tag_names=["timestep", "dataset"], grids={"a": (2, 3)})
    data.range_of("a", "distance", 6)
    data.range_of("b", "entropy", 4)
    x = torch.tensor([[[0.5, 1.2]], [[0.9, 1.0]]], dtype=torch.float64)  # (B=2, H=1, Nq=2)
    data.aggregate(((("timestep", 3),), "a", "distance"), 1, "cpu").add_samples(x, *data.ranges[("a", "distance")])
    one = torch.tensor([[[0.2], [1.0]]], dtype=torch.float64)  # (B=1, H=2, Nq=1): one sample per head
    data.aggregate(((("dataset", "lfw"),), "b", "entropy"), 2, "cpu").add_samples(one, *data.ranges[("b", "entropy")])
    return data


def test_aggregate_frame_leaves_missing_tags_empty_and_std_needs_two_samples():
    frame = aggregate_frame(_data())
    assert list(frame.columns) == ["timestep", "dataset", "layer", "head", "stat", "count", "mean", "std", "m2"]
    a = frame[frame["layer"] == "a"].iloc[0]
    assert a["timestep"] == 3 and pd.isna(a["dataset"]) and a["count"] == 4
    assert np.isclose(a["mean"], 0.9) and np.isclose(a["m2"], 0.16 + 0.09 + 0.0 + 0.01)
    assert np.isclose(a["std"], math.sqrt(0.26 / 3))
    b = frame[frame["layer"] == "b"]
    assert b["head"].tolist() == [0, 1] and b["mean"].tolist() == [0.2, 1.0] and b["std"].isna().all()
    assert pd.isna(b["timestep"]).all() and (b["dataset"] == "lfw").all()


def test_histogram_frame_edges_and_counts():
    hist = histogram_frame(_data())
    a = hist[hist["layer"] == "a"]
    half = math.sqrt(2) / 2
    assert a["bin"].tolist() == [0, 1] and a["count"].tolist() == [1, 3]  # 0.5 | 1.2, 0.9, 1.0 (edge 0.707)
    assert np.allclose(a["lo"], [0, half]) and np.allclose(a["hi"], [half, math.sqrt(2)])
    b = hist[hist["layer"] == "b"]
    assert b["head"].tolist() == [0, 0, 1, 1] and b["count"].tolist() == [1, 0, 0, 1]  # ln 4 / 2 = 0.69
    assert np.allclose(b["hi"].iloc[-1], math.log(4))


def test_per_image_frame_averages_passes_with_equal_tags():
    data = RecorderData(2, tag_names=["timestep"])
    keys = ((("timestep", 1),), (("timestep", 1),))
    data.image_rows.append((keys, [5, 6], "a", "entropy", torch.tensor([[1.0], [2.0]], dtype=torch.float64)))
    data.image_rows.append((keys[:1], [5], "a", "entropy", torch.tensor([[3.0]], dtype=torch.float64)))
    frame = per_image_frame(data)
    assert list(frame.columns) == ["timestep", "image", "layer", "head", "stat", "mean"]
    assert frame[["image", "mean"]].values.tolist() == [[5, 2.0], [6, 2.0]]


def test_maps_take_the_grid_only_when_it_matches():
    data = RecorderData(2, tag_names=[], grids={"a": (2, 3), "b": (2, 2)})
    for layer in ("a", "b"):
        add_map(data.maps, ((), 0, layer, "entropy"), torch.arange(6.0, dtype=torch.float64).view(1, 6), 1)
        add_map(data.maps, ((), 0, layer, "entropy"), torch.full((1, 6), 2.0, dtype=torch.float64), 1)
    tensors = map_tensors(data)
    assert tensors[((), 0, "a", "entropy")].tolist() == [[[1.0, 1.5, 2.0], [2.5, 3.0, 3.5]]]  # (0..5 + 2) / 2
    assert tensors[((), 0, "b", "entropy")].shape == (1, 6)  # 6 queries do not fit a 2 x 2 grid
    frame = maps_frame(data)
    a, b = frame[frame["layer"] == "a"], frame[frame["layer"] == "b"]
    assert a["row"].tolist() == [0, 0, 0, 1, 1, 1] and a["col"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (b["row"] == -1).all() and (b["col"] == -1).all()
    assert a["value"].tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5] and a["query"].tolist() == list(range(6))


def test_empty_data_gives_empty_frames_with_their_columns():
    data = RecorderData(3, tag_names=["timestep"])
    assert list(histogram_frame(data).columns) == ["timestep", "layer", "head", "stat", "bin", "lo", "hi", "count"]
    assert list(maps_frame(data).columns)[:3] == ["timestep", "image", "layer"] and maps_frame(data).empty
    assert aggregate_frame(data).empty and per_image_frame(data).empty and map_tensors(data) == {}
