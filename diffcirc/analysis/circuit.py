"""Minimal circuits by greedy pruning at head granularity (ACDC-style), and their summary.

The algorithm is pure: the caller supplies ``degradation_of(removed) -> percent``, which the
driver implements by running the model with the heads in ``removed`` ablated. Heads are any
hashable items; (layer, head) tuples are written to the trace as removed_layer / removed_head.

Trace schema (``circuit.parquet`` minus its ``dataset`` column): one row per candidate tried,
in order: step (0-based), removed_layer, removed_head (the candidate), kept (bool: True when the
head stays in the circuit because removing it would have brought the degradation to the threshold
or above), degradation (the degradation measured with the candidate removed on top of the heads
already removed). The circuit size is the number of rows with kept True.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, NamedTuple, Optional, Sequence

import pandas as pd

__all__ = ["Circuit", "greedy_minimal_circuit", "summarise_circuits", "TRACE_COLUMNS"]

TRACE_COLUMNS = ["step", "removed_layer", "removed_head", "kept", "degradation"]


class Circuit(NamedTuple):
    """Result of ``greedy_minimal_circuit``: the kept heads and the pruning trace."""

    kept: frozenset
    trace: pd.DataFrame


def _split(head: Hashable) -> tuple:
    if isinstance(head, tuple) and len(head) == 2:
        return head[0], head[1]
    return head, -1


def greedy_minimal_circuit(heads: Iterable[Hashable], degradation_of: Callable[[frozenset], float],
                           threshold_percent: float, order: Optional[Sequence[Hashable]] = None) -> Circuit:
    """Greedy minimal circuit: start from all heads; try removing each candidate in turn (least
    single-head effect first) and keep it removed when ``degradation_of(removed)`` stays strictly
    under ``threshold_percent``; a NaN degradation counts as over the threshold.

    order: the candidate order (a permutation of ``heads``); None computes each head's single
    removal effect with ``degradation_of(frozenset({h}))`` (n extra calls) and sorts ascending,
    ties kept in the input order. ``degradation_of`` is called once per candidate after that.
    """
    heads = list(dict.fromkeys(heads))
    if order is None:
        effect = {h: float(degradation_of(frozenset({h}))) for h in heads}
        order = sorted(heads, key=lambda h: (math.isnan(effect[h]), effect[h] if not math.isnan(effect[h]) else 0.0))
    else:
        order = list(order)
        if len(order) != len(heads) or set(order) != set(heads):
            raise ValueError(f"order must be a permutation of the {len(heads)} heads, got {len(order)} items")
    removed: set = set()
    rows = []
    for step, h in enumerate(order):
        d = float(degradation_of(frozenset(removed | {h})))
        keep = not (d < threshold_percent)
        if not keep:
            removed.add(h)
        layer, index = _split(h)
        rows.append((step, layer, index, keep, d))
    trace = pd.DataFrame(rows, columns=TRACE_COLUMNS).astype({"step": "int64", "kept": "bool", "degradation": "float64"})
    return Circuit(frozenset(h for h in heads if h not in removed), trace)


def summarise_circuits(circuit_df: Optional[pd.DataFrame], datasets: tuple = ("synthetic", "natural")) -> Optional[dict]:
    """Circuit sizes per dataset from a ``circuit.parquet`` frame: {synthetic_size, natural_size,
    ratio (natural / synthetic, NaN when a size is missing or zero), n_heads (candidates tried per
    dataset, {dataset: n}), final_degradation {dataset: degradation at the last accepted removal}}.
    None when there is no circuit table."""
    if circuit_df is None or circuit_df.empty:
        return None
    sizes, tried, final = {}, {}, {}
    for ds, g in circuit_df.groupby("dataset", sort=True):
        kept = g["kept"].astype(bool)
        sizes[ds] = int(kept.sum())
        tried[ds] = int(len(g))
        accepted = g.loc[~kept].sort_values("step")
        final[ds] = float(accepted["degradation"].iloc[-1]) if len(accepted) else 0.0
    syn, nat = datasets
    s, n = sizes.get(syn), sizes.get(nat)
    ratio = n / s if (s and n is not None) else math.nan
    return {f"{syn}_size": s, f"{nat}_size": n, "ratio": ratio, "n_heads": tried, "final_degradation": final}
