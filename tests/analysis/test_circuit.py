"""Greedy minimal circuit on additive degradation functions with known answers; its held-out
evaluation, random-set baseline and overlaps on toy models whose answers are computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from diffcirc.analysis.circuit import (EVAL_COLUMNS, TRACE_COLUMNS, greedy_minimal_circuit, jaccard, random_baseline,
                                       random_head_sets, resample_weights, size_curve, split_images,
                                       summarise_circuits)

WEIGHTS = {("down.0", 0): 1.0, ("down.0", 1): 20.0, ("mid", 0): 3.0, ("mid", 1): 10.0, ("up.1", 0): 2.0,
           ("up.1", 1): 40.0}


class Additive:
    """degradation(removed) = sum of the removed heads' weights; counts calls."""

    def __init__(self, weights):
        self.weights, self.calls = weights, []

    def __call__(self, removed: frozenset) -> float:
        assert isinstance(removed, frozenset)
        self.calls.append(removed)
        return sum(self.weights[h] for h in removed)


def test_additive_known_minimal_set_and_trace():
    f = Additive(WEIGHTS)
    kept, trace = greedy_minimal_circuit(list(WEIGHTS), f, threshold_percent=7.0)
    # Cheapest first: 1 + 2 + 3 = 6 < 7 removed; adding 10, 20 or 40 would cross 7.
    assert kept == frozenset({("mid", 1), ("down.0", 1), ("up.1", 1)})
    assert list(trace.columns) == TRACE_COLUMNS and len(trace) == len(WEIGHTS) and len(f.calls) == 2 * len(WEIGHTS)
    assert trace["step"].tolist() == list(range(6))
    assert list(zip(trace["removed_layer"], trace["removed_head"])) == sorted(WEIGHTS, key=WEIGHTS.get)
    assert trace["kept"].tolist() == [False, False, False, True, True, True]
    assert trace["degradation"].tolist() == [1.0, 3.0, 6.0, 16.0, 26.0, 46.0]
    assert trace["kept"].dtype == bool


def test_threshold_is_strict_and_order_is_respected():
    order = [("up.1", 1), ("mid", 0), ("down.0", 0), ("up.1", 0), ("mid", 1), ("down.0", 1)]
    f = Additive(WEIGHTS)
    kept, trace = greedy_minimal_circuit(WEIGHTS, f, threshold_percent=6.0, order=order)
    assert len(f.calls) == len(WEIGHTS)  # no single-effect pass when the order is given
    assert list(zip(trace["removed_layer"], trace["removed_head"])) == order
    # 40 kept; 3 -> 3, 1 -> 4, 2 -> 6 is not < 6 so kept; 10, 20 kept.
    assert kept == frozenset({("up.1", 1), ("up.1", 0), ("mid", 1), ("down.0", 1)})
    with pytest.raises(ValueError, match="permutation"):
        greedy_minimal_circuit(WEIGHTS, f, 6.0, order=order[:-1])


def test_everything_or_nothing_and_nan():
    kept, _ = greedy_minimal_circuit(WEIGHTS, Additive(WEIGHTS), threshold_percent=1e9)
    assert kept == frozenset()
    kept, _ = greedy_minimal_circuit(WEIGHTS, Additive(WEIGHTS), threshold_percent=0.5)
    assert kept == frozenset(WEIGHTS)
    kept, trace = greedy_minimal_circuit(["a", "b"], lambda removed: math.nan if "a" in removed else 0.0, 5.0)
    assert kept == frozenset({"a"}) and trace["removed_head"].tolist() == [-1, -1]


def test_summarise_circuits():
    traces = []
    for ds, threshold in (("synthetic", 4.0), ("natural", 30.0)):
        _, trace = greedy_minimal_circuit(WEIGHTS, Additive(WEIGHTS), threshold)
        traces.append(trace.assign(dataset=ds))
    s = summarise_circuits(pd.concat(traces, ignore_index=True))
    assert s["synthetic_size"] == 4 and s["natural_size"] == 2 and s["ratio"] == pytest.approx(0.5)
    assert s["n_heads"] == {"natural": 6, "synthetic": 6} and s["final_degradation"]["natural"] == 16.0
    assert summarise_circuits(None) is None and summarise_circuits(pd.DataFrame()) is None


# --------------------------------------------------------------------------- held-out circuits

def test_split_images_partitions_the_ids_from_the_seed():
    ids = list(range(10, 30))
    selection, heldout = split_images(ids, 0.25, seed=3, dataset=1)
    assert len(heldout) == 5 and len(selection) == 15
    assert sorted(selection + heldout) == ids and not set(selection) & set(heldout)
    assert (selection, heldout) == split_images(ids, 0.25, seed=3, dataset=1)
    assert heldout != split_images(ids, 0.25, seed=3, dataset=0)[1]  # each dataset its own draw
    assert heldout != split_images(ids, 0.25, seed=4, dataset=1)[1]  # and each seed
    assert [len(s) for s in split_images([1, 2], 0.01, 0, 0)] == [1, 1]  # at least one image each side
    with pytest.raises(ValueError, match="at least 2 images"):
        split_images([0], 0.5, 0, 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_images(ids, 1.0, 0, 0)


def test_random_head_sets_and_resample_weights_are_fixed_by_the_seed():
    sets = random_head_sets(24, 13, 50, seed=0, dataset=1)
    assert sets == random_head_sets(24, 13, 50, seed=0, dataset=1) and len(sets) == 50
    assert all(len(s) == len(set(s)) == 13 and set(s) <= set(range(24)) for s in sets)
    assert len({tuple(s) for s in sets}) > 40
    # the first sets do not depend on how many are drawn (drawn once, one stream)
    assert random_head_sets(24, 13, 5, seed=0, dataset=1) == sets[:5]
    with pytest.raises(ValueError, match="does not fit"):
        random_head_sets(4, 5, 1, 0, 0)
    w = resample_weights(7, 30, seed=0, dataset=0)
    assert w.shape == (30, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert (w != 1).any() and resample_weights(7, 0, 0, 0).shape == (0, 7)


def test_jaccard_against_hand_counts():
    a = {("l", 0), ("l", 1), ("m", 0), ("m", 3)}
    b = {("l", 1), ("m", 0), ("n", 2)}
    assert jaccard(a, b) == {"intersection": 2, "union": 5, "jaccard": 0.4}
    assert jaccard(a, a)["jaccard"] == 1.0 and jaccard(a, set())["jaccard"] == 0.0
    assert math.isnan(jaccard(set(), set())["jaccard"])


def test_random_baseline_rank_and_p_by_hand():
    # circuit 5.0 against [1, 5, 7, 9, nan]: 2 random sets degrade at most 5 (ties count against
    # the circuit) -> rank 3 of 5, p = 3 / 5; the NaN set is dropped
    b = random_baseline(5.0, [7.0, 1.0, 5.0, 9.0, math.nan])
    assert b["n"] == 4 and b["rank"] == 3 and b["p_value"] == pytest.approx(0.6)
    assert b["median"] == pytest.approx(6.0) and b["q05"] == pytest.approx(1.6) and b["q95"] == pytest.approx(8.7)
    assert random_baseline(0.5, [1.0, 2.0, 3.0])["p_value"] == pytest.approx(0.25)  # at the floor 1 / (n + 1)
    empty = random_baseline(5.0, [])
    assert empty["n"] == 0 and empty["rank"] is None and math.isnan(empty["p_value"])


def test_size_curve_reads_the_accepted_removals():
    _, trace = greedy_minimal_circuit(list(WEIGHTS), Additive(WEIGHTS), threshold_percent=7.0)
    assert size_curve(trace) == [{"removed": 1, "size": 5, "degradation": 1.0},
                                 {"removed": 2, "size": 4, "degradation": 3.0},
                                 {"removed": 3, "size": 3, "degradation": 6.0}]


HEADS = [(f"layer{k // 4}", k % 4) for k in range(12)]
PLANTED = {("layer0", 1), ("layer1", 2), ("layer2", 0)}


class ToyModel:
    """Per-image losses of a toy model: image i has clean loss c_i; removing heads multiplies it by
    1 + sum of their per-image weights (percent / 100). Planted heads cost 30 % each on every image;
    the others 0.5 % each, plus per-image noise of +-0.3 %; ``overfit`` heads cost nothing on the
    images in ``free_on`` and 40 % on every other image."""

    def __init__(self, n_images=24, overfit=(), free_on=(), seed=0):
        rng = np.random.default_rng(seed)
        self.clean = rng.uniform(0.5, 1.5, n_images)
        self.w = {h: (30.0 if h in PLANTED else 0.5) + rng.uniform(-0.3, 0.3, n_images) for h in HEADS}
        for h in overfit:
            self.w[h] = np.where(np.isin(np.arange(n_images), list(free_on)), 0.0, 40.0)

    def losses(self, removed, images) -> np.ndarray:
        images = list(images)
        extra = sum((self.w[h][images] for h in removed), np.zeros(len(images)))
        return self.clean[images] * (1 + extra / 100)

    def degradation_of(self, images):
        clean = self.clean[list(images)].mean()
        return lambda removed: 100 * (self.losses(removed, images).mean() - clean) / clean

    def eval_frame(self, dataset, removed, selection, heldout, random_sets) -> pd.DataFrame:
        """A ``circuit_eval`` frame at one timestep (500): the circuit on both splits, the random
        sets (lists of heads) on the held-out split."""
        rows = []
        for split, images, sets in (("selection", selection, [removed]), ("heldout", heldout, [removed, *random_sets])):
            for k, heads in enumerate(sets):
                condition, rep = ("circuit", 0) if k == 0 else ("random", k - 1)
                for image, loss in zip(images, self.losses(heads, images)):
                    rows.append((dataset, split, 500, condition, "zero", rep, len(removed), image, self.clean[image],
                                 loss))
        return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def _select(model, selection, threshold=10.0):
    kept, trace = greedy_minimal_circuit(HEADS, model.degradation_of(selection), threshold)
    return kept, trace.assign(dataset="synthetic", timestep=500)


def test_a_planted_circuit_is_recovered_and_holds_on_held_out_images():
    model = ToyModel()
    selection, heldout = split_images(range(24), 0.5, seed=0, dataset=0)
    kept, trace = _select(model, selection)
    assert kept == PLANTED  # the nine 0.5 % heads cost ~4.5 % < 10 %; any planted one 30 %
    removed = sorted(set(HEADS) - kept)
    sets = [[HEADS[i] for i in s] for s in random_head_sets(len(HEADS), len(removed), 19, seed=0, dataset=0)]
    s = summarise_circuits(trace, model.eval_frame("synthetic", removed, selection, heldout, sets), n_resamples=999)
    (row,) = s["evaluation"]
    # held out: 9 heads at 0.5 % on average -> 4.5 % of the clean loss, up to the +-0.3 % noise
    expected = 100 * (model.losses(removed, heldout).mean() / model.clean[heldout].mean() - 1)
    assert row["heldout_percent"] == pytest.approx(expected) and 3.0 < row["heldout_percent"] < 6.0
    assert row["ci_low"] <= row["heldout_percent"] <= row["ci_high"] < 10.0
    assert row["selected"] and row["n_removed"] == 9 and (row["n_selection"], row["n_heldout"]) == (12, 12)
    # every random set of 9 of 12 heads removes a planted head (30 %): the circuit ranks first
    assert row["random_n"] == 19 and row["rank"] == 1 and row["p_value"] == pytest.approx(1 / 20)
    assert row["random_median"] > 30.0


def test_a_circuit_that_overfits_its_selection_split_shows_its_held_out_degradation():
    selection, heldout = split_images(range(24), 0.5, seed=0, dataset=0)
    overfit = ("layer2", 3)
    model = ToyModel(overfit=[overfit], free_on=selection)
    kept, trace = _select(model, selection)
    assert overfit not in kept  # harmless on the selection images, so pruned
    removed = sorted(set(HEADS) - kept)
    s = summarise_circuits(trace, model.eval_frame("synthetic", removed, selection, heldout, []), n_resamples=999)
    (row,) = s["evaluation"]
    assert row["selection_percent"] < 10.0
    assert row["selection_percent"] == pytest.approx(s["final_degradation"]["synthetic"])
    # on held-out images the overfit head costs 40 % on top of ~4 %
    assert row["ci_low"] > 40.0 and row["heldout_percent"] > row["selection_percent"] + 35.0
    assert row["random_n"] == 0 and row["rank"] is None


def _trace(dataset, kept, resample=None):
    """A trace with these heads kept and the rest of HEADS removed (degradation 1 each)."""
    rows = [(k, layer, h, (layer, h) in kept, 1.0) for k, (layer, h) in enumerate(HEADS)]
    trace = pd.DataFrame(rows, columns=TRACE_COLUMNS).assign(dataset=dataset, timestep=500)
    return trace if resample is None else trace.assign(resample=resample)


def test_summary_overlap_and_resample_jaccard_against_hand_counts():
    syn = {HEADS[0], HEADS[1], HEADS[2], HEADS[5]}
    nat = {HEADS[1], HEADS[2], HEADS[7]}
    circuit = pd.concat([_trace("synthetic", syn), _trace("natural", nat)], ignore_index=True)
    resamples = pd.concat([_trace("synthetic", {HEADS[0], HEADS[1]}, 0),        # 2 / 4
                           _trace("synthetic", syn | {HEADS[9]}, 1),            # 4 / 5
                           _trace("natural", {HEADS[1], HEADS[7]}, 0),         # 2 / 3
                           _trace("natural", set(), 1)], ignore_index=True)     # 0 / 3
    s = summarise_circuits(circuit, resamples_df=resamples)
    assert {k: s["overlap"][k] for k in ("intersection", "union", "jaccard")} == {"intersection": 2, "union": 5,
                                                                                 "jaccard": 0.4}
    assert s["overlap"]["heads"] == [list(HEADS[1]), list(HEADS[2])]
    assert s["resamples"]["synthetic"] == {"n": 2, "sizes": [2, 5], "jaccard_mean": pytest.approx(0.65),
                                           "jaccard_min": 0.5, "jaccard_max": 0.8}
    assert s["resamples"]["natural"] == {"n": 2, "sizes": [2, 0], "jaccard_mean": pytest.approx(1 / 3),
                                         "jaccard_min": 0.0, "jaccard_max": pytest.approx(2 / 3)}
    assert s["selection_timestep"] == {"natural": 500, "synthetic": 500} and s["evaluation"] is None
    assert [p["size"] for p in s["curve"]["natural"]] == list(range(11, 2, -1))
