"""Greedy minimal circuit on additive degradation functions with known answers."""

import math

import pandas as pd
import pytest

from diffcirc.analysis.circuit import TRACE_COLUMNS, greedy_minimal_circuit, summarise_circuits

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
