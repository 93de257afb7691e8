"""Minimal circuits by greedy pruning at head granularity (ACDC-style), held out from the data they
were selected on, and their summary.

The algorithm is pure: the caller supplies ``degradation_of(removed) -> percent``, which the
driver implements by running the model with the heads in ``removed`` ablated on the selection
split of the images. Heads are any hashable items; (layer, head) tuples are written to the traces
as removed_layer / removed_head. The helpers below fix, from the run's seed alone, what the driver
draws: the selection / held-out split of the images, bootstrap resamples of the selection split,
and the random head sets of the baseline.

Tables (written by ``phases.Experiment.circuit``):

- ``circuit``: the selection trace, one row per candidate tried, in order: dataset, timestep (the
  selection timestep), step (0-based), removed_layer, removed_head (the candidate), kept (bool:
  True when the head stays in the circuit because removing it would have brought the degradation
  to the threshold or above), degradation (percent, on the selection split, with the candidate
  removed on top of the heads already removed). The circuit size is the number of rows with kept
  True; the degradations of the rows with kept False are the size-vs-threshold curve
  (``size_curve``).
- ``circuit_resamples``: the same trace with a ``resample`` column (0-based), one greedy search per
  bootstrap resample of the selection split's images (``resample_weights``).
- ``circuit_eval``: per-image losses of the circuit (its removed set ablated) on both splits at
  every ablation timestep, and of the random head sets of the same removed-set size on the
  held-out split: dataset, split ("selection" | "heldout"), timestep, condition ("circuit" |
  "random"), mode (how the removed heads were ablated: "zero", or "mean": each replaced by its mean
  output per position over the selection split at that timestep, in sample on the selection rows
  and held out on the held-out ones), rep (0 for the circuit, the random set's index), n_removed,
  image, loss_clean, loss_ablated.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from . import significance
from .metrics import _percent

__all__ = ["Circuit", "greedy_minimal_circuit", "split_images", "resample_weights", "random_head_sets", "kept_heads", "jaccard",
           "size_curve", "random_baseline", "summarise_circuits", "TRACE_COLUMNS", "EVAL_COLUMNS"]

TRACE_COLUMNS = ["step", "removed_layer", "removed_head", "kept", "degradation"]
EVAL_COLUMNS = ["dataset", "split", "timestep", "condition", "mode", "rep", "n_removed", "image", "loss_clean",
                "loss_ablated"]

# what each seeded draw is for: one stream per (seed, purpose, dataset), so that changing one draw
# (the number of resamples, the ablation timesteps) never changes another
_SPLIT, _RESAMPLES, _RANDOM_SETS = 1, 2, 3
_TAG = 0xC12C  # keeps these streams apart from every other use of the run's seed


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


# --------------------------------------------------------------------------- seeded draws

def _rng(seed: int, purpose: int, dataset: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _TAG, purpose, int(dataset)])


def split_images(ids: Sequence[int], heldout_fraction: float, seed: int, dataset: int) -> tuple:
    """(selection, heldout): a seeded partition of ``ids`` (each sorted), with round(fraction * n)
    held out, at least one image on each side. The circuit is selected on the first and evaluated on
    the second; noise is seeded per image, so the two splits also see disjoint noise draws."""
    ids = list(ids)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if len(ids) < 2:
        raise ValueError(f"a held-out circuit needs at least 2 images (one to select on, one held out), got {len(ids)}")
    n_heldout = min(max(int(round(heldout_fraction * len(ids))), 1), len(ids) - 1)
    perm = _rng(seed, _SPLIT, dataset).permutation(len(ids))
    heldout = sorted(ids[i] for i in perm[:n_heldout])
    selection = sorted(ids[i] for i in perm[n_heldout:])
    return selection, heldout


def resample_weights(n_images: int, n_resamples: int, seed: int, dataset: int) -> np.ndarray:
    """(n_resamples, n_images) int64 counts of each selection image in each bootstrap resample (n
    draws with replacement): a resample's loss is the count-weighted mean of the per-image losses."""
    rng = _rng(seed, _RESAMPLES, dataset)
    draws = rng.integers(0, n_images, (n_resamples, n_images))
    return np.stack([np.bincount(row, minlength=n_images) for row in draws]) if n_resamples else \
        np.zeros((0, n_images), dtype=np.int64)


def random_head_sets(n_heads: int, size: int, n_sets: int, seed: int, dataset: int) -> list:
    """n_sets sorted index lists, each ``size`` distinct heads of range(n_heads) drawn uniformly, all
    from one stream fixed by (seed, dataset): the same sets whatever the timesteps evaluated."""
    if not 0 <= size <= n_heads:
        raise ValueError(f"a random head set of size {size} does not fit {n_heads} heads")
    rng = _rng(seed, _RANDOM_SETS, dataset)
    return [sorted(int(i) for i in rng.choice(n_heads, size=size, replace=False)) for _ in range(n_sets)]


# --------------------------------------------------------------------------- statistics of circuits

def kept_heads(trace: pd.DataFrame) -> frozenset:
    """The circuit of one trace: {(removed_layer, removed_head)} of its rows with kept True."""
    k = trace[trace["kept"].astype(bool)]
    return frozenset(zip(k["removed_layer"], k["removed_head"].astype(int)))


def jaccard(a: Iterable, b: Iterable) -> dict:
    """{intersection, union, jaccard = |a & b| / |a | b|} of two head sets (jaccard NaN when both
    are empty: two empty circuits neither agree nor disagree)."""
    a, b = set(a), set(b)
    inter, union = len(a & b), len(a | b)
    return {"intersection": inter, "union": union, "jaccard": inter / union if union else math.nan}


def size_curve(trace: pd.DataFrame) -> list:
    """The size-vs-threshold curve of one trace, read off its accepted removals in order:
    [{removed (heads removed so far), size (heads left), degradation}]. A rerun with a threshold
    tau <= the run's accepts the same removals up to the first point whose degradation is >= tau,
    so the size there is an upper bound on that rerun's circuit size (it may accept later
    candidates this run's path never tried)."""
    t = trace.sort_values("step")
    accepted = t.loc[~t["kept"].astype(bool), "degradation"].astype(float).tolist()
    n = len(t)
    return [{"removed": k + 1, "size": n - k - 1, "degradation": d} for k, d in enumerate(accepted)]


def random_baseline(circuit_percent: float, random_percents) -> dict:
    """The circuit's removal against random removals of the same size: {n (finite random sets),
    median, q05, q95 (of their degradations), rank (1 + the random sets degrading at most as much as
    the circuit's removal: its place among the n + 1, least degrading first, ties against the
    circuit), p_value = rank / (n + 1), one-sided: how often a random set of heads removed costs as
    little as removing everything outside the circuit}. NaN / None fields when there is no random
    set or the circuit's degradation is undefined."""
    r = np.asarray(random_percents, dtype=np.float64).reshape(-1)
    r = r[np.isfinite(r)]
    out = {"n": int(r.size), "median": math.nan, "q05": math.nan, "q95": math.nan, "rank": None, "p_value": math.nan}
    if r.size == 0:
        return out
    out.update(median=float(np.median(r)), q05=float(np.quantile(r, 0.05)), q95=float(np.quantile(r, 0.95)))
    if math.isfinite(circuit_percent):
        rank = 1 + int((r <= circuit_percent).sum())
        out.update(rank=rank, p_value=rank / (r.size + 1))
    return out


def _losses(g: pd.DataFrame) -> tuple:
    """(clean, ablated) per-image float64 arrays of one condition, in image order."""
    g = g.sort_values("image")
    return g["loss_clean"].to_numpy(np.float64), g["loss_ablated"].to_numpy(np.float64)


def _evaluation_rows(eval_df: pd.DataFrame, selected_at: dict, n_resamples: int, seed: int) -> list:
    """One row per (dataset, timestep) of a ``circuit_eval`` frame (see ``summarise_circuits``)."""
    rows = []
    for i, ((ds, t), g) in enumerate(eval_df.groupby(["dataset", "timestep"], sort=True)):
        circ = g[g["condition"] == "circuit"]
        sel, held = circ[circ["split"] == "selection"], circ[circ["split"] == "heldout"]
        clean, abl = _losses(held)
        ci = significance.paired_bootstrap_ci(clean, abl, _percent, n_resamples=n_resamples, seed=seed + i) \
            if n_resamples > 0 and len(held) else significance.Interval(
                float(_percent(clean, abl)) if len(held) else math.nan, math.nan, math.nan, 0.95)
        rand = g[(g["condition"] == "random") & (g["split"] == "heldout")]
        rand_pct = [float(_percent(*_losses(r))) for _, r in rand.groupby("rep", sort=True)]
        base = random_baseline(ci.value, rand_pct)
        rows.append({"dataset": ds, "timestep": int(t), "selected": selected_at.get(ds) == int(t),
                     "n_removed": int(circ["n_removed"].iloc[0]) if len(circ) else None,
                     "n_selection": int(len(sel)), "n_heldout": int(len(held)),
                     "selection_percent": float(_percent(*_losses(sel))) if len(sel) else math.nan,
                     "heldout_percent": ci.value, "ci_low": ci.ci_low, "ci_high": ci.ci_high,
                     "random_n": base["n"], "random_median": base["median"], "random_q05": base["q05"],
                     "random_q95": base["q95"], "rank": base["rank"], "p_value": base["p_value"]})
    return rows


def _ablation_mode(eval_df: pd.DataFrame) -> str:
    """The one ablation mode of a ``circuit_eval`` frame."""
    if "mode" not in eval_df.columns:
        return "zero"
    modes = sorted(set(eval_df["mode"]))
    if len(modes) != 1:
        raise ValueError(f"circuit_eval mixes ablation modes {modes}: one run ablates its circuit one way")
    return modes[0]


def _resample_overlap(resamples_df: pd.DataFrame, circuits: dict) -> dict:
    """{dataset: {n, sizes, jaccard_mean, jaccard_min, jaccard_max}}: each resample's circuit
    against the circuit of the whole selection split."""
    out = {}
    for ds, g in resamples_df.groupby("dataset", sort=True):
        sizes, js = [], []
        for _, r in g.groupby("resample", sort=True):
            kept = kept_heads(r)
            sizes.append(len(kept))
            js.append(jaccard(kept, circuits.get(ds, frozenset()))["jaccard"])
        finite = [j for j in js if math.isfinite(j)]
        out[ds] = {"n": len(sizes), "sizes": sizes,
                   "jaccard_mean": float(np.mean(finite)) if finite else math.nan,
                   "jaccard_min": float(min(finite)) if finite else math.nan,
                   "jaccard_max": float(max(finite)) if finite else math.nan}
    return out


def summarise_circuits(circuit_df: Optional[pd.DataFrame], eval_df: Optional[pd.DataFrame] = None,
                       resamples_df: Optional[pd.DataFrame] = None, n_resamples: int = 2000, seed: int = 0,
                       datasets: tuple = ("synthetic", "natural")) -> Optional[dict]:
    """The circuits of a run from its ``circuit`` trace (and, when given, ``circuit_eval`` and
    ``circuit_resamples``). None when there is no circuit table. Keys:

    - {synthetic}_size, {natural}_size, ratio (natural / synthetic, NaN when a size is missing or
      zero), n_heads (candidates tried per dataset, {dataset: n}), final_degradation {dataset:
      degradation at the last accepted removal, on the selection split}
    - selection_timestep {dataset: t} (None for a trace without a timestep column)
    - overlap: ``jaccard`` of the two datasets' circuits, plus {heads: the shared heads [layer, head]}
    - curve {dataset: ``size_curve``}
    - evaluation: None without ``circuit_eval``, else one row per (dataset, timestep): selected (the
      selection timestep), n_removed, n_selection, n_heldout (images), selection_percent (the
      circuit's degradation on the selection split: in-sample), heldout_percent with ci_low,
      ci_high (paired bootstrap over held-out images of the percent, seed + row index), random_n,
      random_median, random_q05, random_q95, rank, p_value (``random_baseline`` against random
      removed sets of the same size on the same held-out images)
    - resamples: None without ``circuit_resamples``, else ``_resample_overlap``
    - ablation: how the removed heads were ablated, ``circuit_eval``'s mode ("zero" | "mean"); "zero"
      without a mode column (tables made before mean ablation existed), None without circuit_eval
    """
    if circuit_df is None or circuit_df.empty:
        return None
    sizes, tried, final, curve, circuits, selected_at = {}, {}, {}, {}, {}, {}
    for ds, g in circuit_df.groupby("dataset", sort=True):
        kept = g["kept"].astype(bool)
        sizes[ds] = int(kept.sum())
        tried[ds] = int(len(g))
        accepted = g.loc[~kept].sort_values("step")
        final[ds] = float(accepted["degradation"].iloc[-1]) if len(accepted) else 0.0
        curve[ds] = size_curve(g)
        circuits[ds] = kept_heads(g)
        selected_at[ds] = int(g["timestep"].iloc[0]) if "timestep" in g.columns else None
    syn, nat = datasets
    s, n = sizes.get(syn), sizes.get(nat)
    ratio = n / s if (s and n is not None) else math.nan
    overlap = jaccard(circuits.get(syn, ()), circuits.get(nat, ()))
    overlap["heads"] = [list(h) for h in sorted(circuits.get(syn, frozenset()) & circuits.get(nat, frozenset()))]
    has = lambda f: f is not None and not f.empty  # noqa: E731
    return {f"{syn}_size": s, f"{nat}_size": n, "ratio": ratio, "n_heads": tried, "final_degradation": final,
            "selection_timestep": selected_at, "overlap": overlap, "curve": curve,
            "evaluation": _evaluation_rows(eval_df, selected_at, n_resamples, seed) if has(eval_df) else None,
            "resamples": _resample_overlap(resamples_df, circuits) if has(resamples_df) else None,
            "ablation": _ablation_mode(eval_df) if has(eval_df) else None}
