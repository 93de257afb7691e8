"""Functional head roles: transparent, configurable rules on per-head features, checked against the
random-weights control, and validated by ablation against layer-matched random head sets.

Roles are hypotheses about what a head does, read off its attention statistics. Each rule is read
beside the random-weights model (same architecture, untrained: ``rule_checks``): a rule that fires
on most of its heads describes the architecture, not a learned mechanism, and is reported
"uninformative"; a rule on image-map features computed from fewer than ``min_map_images`` images
is "under-powered". The study tests each role by ablating its heads against random head sets with
as many heads in every layer (``layer_matched_sets``, ``role_validation``).

Features (``head_features``, one row per (layer, head) of one model):

- ``entropy``, ``entropy_sd``: mean and population sd of the head's per-query entropy (nats)
  over all queries of all images, timesteps and datasets (the aggregates merged exactly,
  Chan et al.), so the two describe the same distribution.
- ``normalised``: entropy / ln n_keys (needs ``layers``): 1 is uniform attention.
- ``distance``: mean attention distance (token grids mapped to [0, 1]^2; a head attending to its
  own token gives 0); ``distance_uniform``: the same for uniform attention over the layer's grid
  (``uniform_distance``: 0.517 on 8 x 8); ``distance_rel`` = distance / distance_uniform.
- ``label_mass_<source>``, ``label_mass_uniform_<source>``, ``label_mass_lift_<source>`` for each
  label source (``LABEL_SOURCES``: the synthetic faces' true "parts", the natural images' SLIC
  "superpixels"; never pooled across sources): mean same-label attention mass, the mass uniform
  attention would give (stat "label_mass_uniform"), and their ratio (1 = no preference for the
  query's own label). NaN when the driver did not record the uniform expectation.
- ``edge_corr``, ``texture_corr``: mean over datasets and timesteps of the correlation of the
  head's per-query entropy map with the clean image's edge-magnitude / texture-energy map
  (``features_maps``). Optional ``foreground_corr`` (entropy map vs foreground mask) is used
  when that column exists. ``map_images``: the images behind them (sum over datasets of the
  table's ``n_images``; NaN when it does not say).
- ``timestep_sensitivity``: spread over timesteps of H_t (H averaged over datasets) divided by
  its mean; spread = max - min ("range", default) or the sd ("sd").
- ``dataset_sensitivity``: |H_natural - H_synthetic| / mean(H_natural, H_synthetic), each H
  averaged over timesteps.

Rules (thresholds in ``RoleRules``; ``lift`` is ``label_mass_lift_<RoleRules.label_source>``; a NaN
feature never satisfies a rule):

==========================  ===============================================================
edge_detection              edge_corr >= edge_corr_min
texture_analysis            texture_corr >= texture_corr_min
semantic_grouping           lift >= semantic_lift_min
foreground_background       |foreground_corr| >= foreground_corr_min when that feature exists,
                            else fgbg_lift_min <= lift < semantic_lift_min
global_layout               distance_rel >= global_distance_rel_min and normalised >= global_normalised_min
local_smoothing             distance_rel <= local_distance_rel_max and normalised >= local_normalised_min
timestep_gated              timestep_sensitivity >= timestep_sensitivity_min
dataset_adaptive            dataset_sensitivity >= dataset_sensitivity_min
==========================  ===============================================================

The primary ``role`` is the first matching rule in ``RoleRules.priority`` (evidence tied to
image content first, then attention geometry, then sensitivity), else "unassigned"; ``roles``
lists every matching rule in priority order.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from . import significance

__all__ = ["ROLES", "ROLE_LABELS", "UNASSIGNED", "LABEL_SOURCES", "MAP_ROLES", "RoleRules", "uniform_distance",
           "head_features", "assign_roles", "role_summary", "rule_checks", "roles_by_model", "role_set_seed",
           "layer_matched_sets", "hierarchical_bootstrap", "role_validation"]

ROLES = ("edge_detection", "texture_analysis", "semantic_grouping", "global_layout", "local_smoothing",
         "foreground_background", "timestep_gated", "dataset_adaptive")
ROLE_LABELS = {
    "edge_detection": "edge detection",
    "texture_analysis": "texture analysis",
    "semantic_grouping": "semantic (part) grouping",
    "global_layout": "global layout",
    "local_smoothing": "local smoothing",
    "foreground_background": "foreground/background separation",
    "timestep_gated": "timestep-gated",
    "dataset_adaptive": "dataset-adaptive",
    "unassigned": "unassigned",
}
UNASSIGNED = "unassigned"
# What each dataset's label maps are: true part ids on the synthetic faces, SLIC superpixels on
# every natural loader (diffcirc.data.items); label features are kept apart per source.
LABEL_SOURCES = {"synthetic": "parts", "natural": "superpixels"}
# Rules that read image-map features (entropy map vs image maps): they need enough images.
MAP_ROLES = ("edge_detection", "texture_analysis")
_LABEL_FEATURES = tuple(f"{stat}_{src}" for src in LABEL_SOURCES.values()
                        for stat in ("label_mass", "label_mass_uniform", "label_mass_lift"))
FEATURES = ("entropy", "entropy_sd", "normalised", "distance", "distance_uniform", "distance_rel", *_LABEL_FEATURES,
            "edge_corr", "texture_corr", "foreground_corr", "map_images", "timestep_sensitivity",
            "dataset_sensitivity")


@dataclass(frozen=True)
class RoleRules:
    """Thresholds of the role rules (see the module docstring for the rules themselves) and of the
    checks every rule gets (``rule_checks``)."""

    edge_corr_min: float = 0.3
    """edge_detection: minimum correlation of the entropy map with the image's edge magnitude."""
    texture_corr_min: float = 0.3
    """texture_analysis: minimum correlation of the entropy map with the image's texture energy."""
    semantic_lift_min: float = 1.5
    """semantic_grouping: minimum same-label attention mass relative to uniform attention."""
    fgbg_lift_min: float = 1.15
    """foreground_background (without foreground_corr): lift at least this and below semantic_lift_min."""
    foreground_corr_min: float = 0.3
    """foreground_background (with foreground_corr): minimum |correlation| with the foreground mask."""
    label_source: str = "parts"
    """The label source (a value of LABEL_SOURCES) whose lift the label rules read."""
    global_distance_rel_min: float = 0.6
    """global_layout: minimum attention distance relative to uniform attention over the layer's grid."""
    global_normalised_min: float = 0.7
    """global_layout: minimum normalised entropy (attention spread over much of the image)."""
    local_distance_rel_max: float = 0.2
    """local_smoothing: maximum attention distance relative to uniform attention over the layer's grid."""
    local_normalised_min: float = 0.1
    """local_smoothing: minimum normalised entropy (a spread over neighbours, not a copy of one token)."""
    timestep_sensitivity_min: float = 0.2
    """timestep_gated: minimum spread of H over timesteps relative to its mean."""
    dataset_sensitivity_min: float = 0.1
    """dataset_adaptive: minimum |H_nat - H_syn| relative to their mean."""
    timestep_spread: str = "range"
    """How timestep sensitivity measures spread over timesteps: "range" (max - min) or "sd"."""
    uninformative_share: float = 0.5
    """A rule that fires on at least this share of the random-weights model's heads is uninformative."""
    min_map_images: int = 32
    """Image-map rules (MAP_ROLES) read from fewer images than this are under-powered."""
    priority: tuple = ("semantic_grouping", "foreground_background", "edge_detection", "texture_analysis",
                       "local_smoothing", "global_layout", "timestep_gated", "dataset_adaptive")
    """Order in which rules are tried for the primary role (every name in ROLES, each once)."""

    def __post_init__(self):
        if sorted(self.priority) != sorted(ROLES):
            raise ValueError(f"priority must order exactly the roles {list(ROLES)}, got {list(self.priority)}")
        if self.timestep_spread not in ("range", "sd"):
            raise ValueError(f"timestep_spread must be 'range' or 'sd', got {self.timestep_spread!r}")
        if self.label_source not in LABEL_SOURCES.values():
            raise ValueError(f"label_source must be one of {sorted(LABEL_SOURCES.values())}, got {self.label_source!r}")
        if not 0 < self.uninformative_share <= 1:
            raise ValueError(f"uninformative_share must be in (0, 1], got {self.uninformative_share}")


def uniform_distance(h: int, w: int) -> float:
    """Mean attention distance of uniform attention from every query to every key of one (h, w)
    token grid (tokens at ((r + 0.5) / h, (c + 0.5) / w), as the kernel places them): the mean
    over all (query, key) pairs of their distance, summed over the (2h - 1)(2w - 1) offsets, each
    weighted by the (h - |dr|)(w - |dc|) pairs it separates. 0.5214 for a continuous unit square."""
    if h < 1 or w < 1:
        raise ValueError(f"a token grid needs h, w >= 1, got ({h}, {w})")
    dr, dc = np.arange(-(h - 1), h), np.arange(-(w - 1), w)
    pairs = np.outer(h - np.abs(dr), w - np.abs(dc)).astype(np.float64)
    dist = np.sqrt((dr[:, None] / h) ** 2 + (dc[None, :] / w) ** 2)
    return float((pairs * dist).sum() / (h * w) ** 2)


def _select_model(frame: pd.DataFrame, model: str) -> pd.DataFrame:
    if "model" in frame.columns:
        return frame[frame["model"] == model]
    return frame


def _pooled(agg: pd.DataFrame) -> pd.DataFrame:
    """Merge (count, mean, m2) rows per (layer, head) exactly: mean and population sd."""
    n = agg["count"].astype(np.float64)
    f = agg.assign(_n=n, _s=n * agg["mean"], _q=agg["m2"] + n * agg["mean"] ** 2)
    g = f.groupby(["layer", "head"], sort=True)[["_n", "_s", "_q"]].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = g["_s"] / g["_n"]
        var = (g["_q"] - g["_n"] * mean ** 2) / g["_n"]
    return pd.DataFrame({"mean": mean, "sd": np.sqrt(var.clip(lower=0.0))})


def _label_features(agg: pd.DataFrame, index: pd.Index) -> dict:
    """{column: Series over index} of the label features, one set per label source: the rows of
    the datasets with that source alone, so parts and superpixels never mix."""
    out = {}
    for dataset, source in LABEL_SOURCES.items():
        rows = agg[agg["dataset"] == dataset] if "dataset" in agg.columns else agg.iloc[:0]
        means = {}
        for stat in ("label_mass", "label_mass_uniform"):
            s = rows[rows["stat"] == stat]
            means[stat] = _pooled(s)["mean"].reindex(index) if len(s) else pd.Series(np.nan, index=index)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = means["label_mass"] / means["label_mass_uniform"]
        out[f"label_mass_{source}"] = means["label_mass"]
        out[f"label_mass_uniform_{source}"] = means["label_mass_uniform"]
        out[f"label_mass_lift_{source}"] = lift.where(np.isfinite(lift))
    return out


def _map_features(features_maps: Optional[pd.DataFrame], model: str, index: pd.Index) -> dict:
    """{column: Series over index}: the image-map correlations (mean over datasets and timesteps)
    and map_images, the images behind them (per dataset the table's n_images, summed)."""
    out = {c: pd.Series(np.nan, index=index) for c in ("edge_corr", "texture_corr", "foreground_corr", "map_images")}
    if features_maps is None or not len(features_maps):
        return out
    fm = _select_model(features_maps, model)
    cols = [c for c in ("edge_corr", "texture_corr", "foreground_corr") if c in fm.columns]
    if not cols or not len(fm):
        return out
    means = fm.groupby(["layer", "head"], sort=True)[cols].mean()
    for c in cols:
        out[c] = means[c].reindex(index)
    if "n_images" in fm.columns:
        # the same images at every timestep: each dataset counts once
        per_ds = fm.groupby(["layer", "head", "dataset"], sort=True)["n_images"].max()
        out["map_images"] = per_ds.groupby(["layer", "head"]).sum().astype(np.float64).reindex(index)
    return out


def head_features(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame] = None,
                  features_maps: Optional[pd.DataFrame] = None, model: str = "trained",
                  timestep_spread: str = "range", datasets: tuple = ("synthetic", "natural")) -> pd.DataFrame:
    """One row per (layer, head) of ``model`` with the features in the module docstring, plus
    kind and n_keys when ``layers`` is given. Missing inputs give NaN features."""
    agg = _select_model(aggregates, model)
    ent = agg[agg["stat"] == "entropy"]
    pooled = _pooled(ent)
    out = pd.DataFrame({"entropy": pooled["mean"], "entropy_sd": pooled["sd"]})
    s = agg[agg["stat"] == "distance"]
    out["distance"] = _pooled(s)["mean"].reindex(out.index) if len(s) else np.nan
    for col, values in {**_label_features(agg, out.index), **_map_features(features_maps, model, out.index)}.items():
        out[col] = values

    # Sensitivities from the per-cell means.
    by_t = ent.groupby(["layer", "head", "timestep"], sort=True)["mean"].mean().unstack("timestep")
    if timestep_spread == "range":
        spread = by_t.max(axis=1) - by_t.min(axis=1)
    elif timestep_spread == "sd":
        spread = by_t.std(axis=1, ddof=0)
    else:
        raise ValueError(f"timestep_spread must be 'range' or 'sd', got {timestep_spread!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        out["timestep_sensitivity"] = (spread / by_t.mean(axis=1)).reindex(out.index)
    by_d = ent.groupby(["layer", "head", "dataset"], sort=True)["mean"].mean().unstack("dataset")
    syn, nat = datasets
    if syn in by_d.columns and nat in by_d.columns:
        with np.errstate(divide="ignore", invalid="ignore"):
            sens = (by_d[nat] - by_d[syn]).abs() / (0.5 * (by_d[nat] + by_d[syn]))
        out["dataset_sensitivity"] = sens.reindex(out.index)
    else:
        out["dataset_sensitivity"] = np.nan

    out = out.reset_index()
    out["kind"], out["n_keys"], out["distance_uniform"] = None, np.nan, np.nan
    if layers is not None and len(layers):
        info = layers.drop_duplicates("layer").set_index("layer")
        if "kind" in info.columns:
            out["kind"] = out["layer"].map(info["kind"])
        out["n_keys"] = out["layer"].map(pd.to_numeric(info["n_keys"], errors="coerce")).astype(np.float64)
        out["distance_uniform"] = out["layer"].map(_uniform_distances(info)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_keys = np.log(out["n_keys"].to_numpy(dtype=np.float64))
        out["normalised"] = np.where(log_keys > 0, out["entropy"].to_numpy() / log_keys, np.nan)
        out["distance_rel"] = out["distance"] / out["distance_uniform"]
    out.insert(0, "model", model)
    return out[["model", "layer", "head", "kind", "n_keys", *FEATURES]]


def _uniform_distances(info: pd.DataFrame) -> pd.Series:
    """{layer: uniform_distance of its grid} for the layers whose grid is known (NaN otherwise:
    a layer without image-token grid has no attention distance)."""
    def one(row):
        h, w = pd.to_numeric(row.get("grid_h"), errors="coerce"), pd.to_numeric(row.get("grid_w"), errors="coerce")
        return uniform_distance(int(h), int(w)) if np.isfinite(h) and np.isfinite(w) and h > 0 and w > 0 else np.nan

    return pd.Series({layer: one(row) for layer, row in info.iterrows()}, dtype=np.float64)


def _rule_masks(f: pd.DataFrame, r: RoleRules) -> dict:
    def col(name):
        return f[name].to_numpy(dtype=np.float64) if name in f.columns else np.full(len(f), np.nan)

    with np.errstate(invalid="ignore"):
        lift, dist, norm = col(f"label_mass_lift_{r.label_source}"), col("distance_rel"), col("normalised")
        fg = col("foreground_corr")
        fgbg = np.where(np.isfinite(fg), np.abs(fg) >= r.foreground_corr_min,
                        (lift >= r.fgbg_lift_min) & (lift < r.semantic_lift_min))
        return {
            "edge_detection": col("edge_corr") >= r.edge_corr_min,
            "texture_analysis": col("texture_corr") >= r.texture_corr_min,
            "semantic_grouping": lift >= r.semantic_lift_min,
            "foreground_background": fgbg,
            "global_layout": (dist >= r.global_distance_rel_min) & (norm >= r.global_normalised_min),
            "local_smoothing": (dist <= r.local_distance_rel_max) & (norm >= r.local_normalised_min),
            "timestep_gated": col("timestep_sensitivity") >= r.timestep_sensitivity_min,
            "dataset_adaptive": col("dataset_sensitivity") >= r.dataset_sensitivity_min,
        }


def assign_roles(features: pd.DataFrame, rules: Optional[RoleRules] = None) -> pd.DataFrame:
    """``features`` plus ``role`` (primary: first match in ``rules.priority``, else "unassigned")
    and ``roles`` (list of every matching role, in priority order)."""
    rules = rules or RoleRules()
    masks = _rule_masks(features, rules)
    out = features.copy()
    matched = [[name for name in rules.priority if masks[name][i]] for i in range(len(out))]
    out["role"] = [m[0] if m else UNASSIGNED for m in matched]
    out["roles"] = matched
    return out


def role_summary(assigned: pd.DataFrame, rules: Optional[RoleRules] = None, by: str = "role") -> pd.DataFrame:
    """Per role (every role in priority order, then unassigned): n_heads, n_matching (heads whose
    rule fires, primary or not), entropy_mean and entropy_sd (mean and sd, ddof=1, over the
    role's heads of their entropy; sd NaN for fewer than 2 heads), normalised_mean. ``by="role"``
    takes the heads with that primary role, ``by="roles"`` every head matching the rule."""
    rules = rules or RoleRules()
    if by not in ("role", "roles"):
        raise ValueError(f"by must be 'role' or 'roles', got {by!r}")
    rows = []
    for role in (*rules.priority, UNASSIGNED):
        primary = (assigned["role"] == role).to_numpy(dtype=bool)
        if role == UNASSIGNED:
            matching = primary
        else:
            matching = np.array([role in rs for rs in assigned["roles"]], dtype=bool)
        mask = matching if by == "roles" else primary
        h = assigned.loc[mask, "entropy"].to_numpy(dtype=np.float64)
        norm = assigned.loc[mask, "normalised"].to_numpy(dtype=np.float64)
        rows.append({
            "role": role,
            "n_heads": int(mask.sum()),
            "n_matching": int(matching.sum()),
            "entropy_mean": float(np.mean(h)) if h.size else math.nan,
            "entropy_sd": float(np.std(h, ddof=1)) if h.size > 1 else math.nan,
            "normalised_mean": float(np.nanmean(norm)) if np.isfinite(norm).any() else math.nan,
        })
    return pd.DataFrame(rows)


def rule_checks(trained: pd.DataFrame, control: Optional[pd.DataFrame], rules: Optional[RoleRules] = None
                ) -> pd.DataFrame:
    """How far each rule can be trusted, one row per role in priority order.

    trained, control: ``assign_roles`` of the trained and the random-weights model (control None:
    no random-weights model was traced). Columns: role; n_matching (trained heads whose rule fires);
    random_matching, random_heads, random_share (the same on the control, and its share of the
    control's heads); map_images (fewest images behind a trained head's map features, MAP_ROLES
    only); status: "uninformative" (random_share >= rules.uninformative_share: the rule describes
    the architecture), else "under-powered" (an image-map rule from fewer than
    rules.min_map_images images, or from an unknown number), else "no control" (no
    random-weights model), else "informative".
    """
    rules = rules or RoleRules()
    rows = []
    for role in rules.priority:
        n = int(sum(role in rs for rs in trained["roles"]))
        if control is not None and len(control):
            k, total = int(sum(role in rs for rs in control["roles"])), len(control)
            share = k / total
        else:
            k, total, share = pd.NA, pd.NA, math.nan
        images = math.nan
        if role in MAP_ROLES and "map_images" in trained.columns and len(trained):
            images = float(trained["map_images"].min(skipna=False))  # NaN when any head's count is unknown
        if share == share and share >= rules.uninformative_share:
            status = "uninformative"
        elif role in MAP_ROLES and not images >= rules.min_map_images:
            status = "under-powered"
        elif share != share:
            status = "no control"
        else:
            status = "informative"
        rows.append({"role": role, "n_matching": n, "random_matching": k, "random_heads": total,
                     "random_share": share, "map_images": images, "status": status})
    out = pd.DataFrame(rows)
    return out.astype({"random_matching": "Int64", "random_heads": "Int64"})


def roles_by_model(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame] = None,
                   features_maps: Optional[pd.DataFrame] = None, rules: Optional[RoleRules] = None,
                   models: tuple = ("trained", "random")) -> dict:
    """{model: assign_roles(head_features(...))} for each model present in ``aggregates``, with
    the same rules, so the trained model's roles can be set beside the random-weights control's."""
    rules = rules or RoleRules()
    present = set(aggregates["model"]) if "model" in aggregates.columns else {models[0]}
    return {m: assign_roles(head_features(aggregates, layers, features_maps, m, rules.timestep_spread), rules)
            for m in models if m in present}


# -- random head sets ------------------------------------------------------------------------

def role_set_seed(seed: int, role: str) -> np.random.SeedSequence:
    """The seed of a role's random head sets: the run's seed and the role's name (CRC-32, stable
    across processes, unlike hash()), so the sets change with neither the ablation timesteps nor
    the other roles."""
    return np.random.SeedSequence([int(seed), zlib.crc32(role.encode("utf-8"))])


def layer_matched_sets(heads: list, role_heads: list, n_sets: int, seed) -> list:
    """Random head sets with as many heads in every layer as ``role_heads`` and none of them.

    heads: every (layer, head) of the model; role_heads: the role's (layer, head)s, a subset;
    n_sets: how many sets at most; seed: what ``numpy.random.default_rng`` takes
    (``role_set_seed``). Returns a list of distinct sets, each a sorted list of (layer, head):
    every possible set when there are at most n_sets of them (the exact randomisation
    distribution), else n_sets distinct sets drawn uniformly; [] when a layer has fewer heads
    outside the role than in it (no layer-matched set exists).
    """
    role = set(role_heads)
    if not role <= set(heads):
        raise ValueError(f"role heads {sorted(role - set(heads))} are not heads of the model")
    if n_sets < 1:
        raise ValueError(f"n_sets must be >= 1, got {n_sets}")
    counts = {}
    for layer, _ in role_heads:
        counts[layer] = counts.get(layer, 0) + 1
    pools = {layer: [lh for lh in heads if lh[0] == layer and lh not in role] for layer in counts}
    if any(len(pools[layer]) < k for layer, k in counts.items()):
        return []
    layers = sorted(counts)
    total = math.prod(math.comb(len(pools[layer]), counts[layer]) for layer in layers)
    if total <= n_sets:
        per_layer = [itertools.combinations(pools[layer], counts[layer]) for layer in layers]
        return [sorted(itertools.chain.from_iterable(combo)) for combo in itertools.product(*per_layer)]
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    while len(out) < n_sets:  # total > n_sets distinct sets exist: this ends
        pick = tuple(sorted(pools[layer][i] for layer in layers
                            for i in rng.choice(len(pools[layer]), size=counts[layer], replace=False)))
        if pick not in seen:
            seen.add(pick)
            out.append(list(pick))
    return out


# -- validation ------------------------------------------------------------------------------

# Degradations closer than this many percentage points are float32 rounding apart: ties.
_TIE = 1e-4


def _percent(inc_sum, clean_sum):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * inc_sum / clean_sum


def hierarchical_bootstrap(role_inc: list, clean: list, random_inc: list, n_resamples: int = 2000,
                           seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of D(role) - median over sets of D(set), resampling timesteps, then
    images within each drawn timestep.

    Per timestep t (lists of T arrays): role_inc[t] (n_t,) error increases of the role's ablation,
    clean[t] (n_t,) clean errors, random_inc[t] (n_t, S) increases of the S random sets on the same
    images. D = mean over the T drawn timesteps of 100 x (sum of increases) / (sum of clean
    errors) over that timestep's drawn images; a timestep drawn twice gets two independent image
    draws. Returns (n_resamples,) float64.
    """
    T = len(role_inc)
    if T == 0 or not (len(clean) == len(random_inc) == T):
        raise ValueError(f"need the same T >= 1 timesteps in role_inc, clean, random_inc, got "
                         f"{len(role_inc)}, {len(clean)}, {len(random_inc)}")
    rng = np.random.default_rng(seed)
    S = np.asarray(random_inc[0]).shape[1]
    slots = rng.integers(0, T, size=(n_resamples, T))  # the timesteps each replicate draws
    role_sum = np.zeros(n_resamples)
    set_sum = np.zeros((n_resamples, S))
    for j in range(T):
        for t in range(T):
            rows = np.flatnonzero(slots[:, j] == t)
            if not rows.size:
                continue
            n = len(role_inc[t])
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=rows.size).astype(np.float64)  # (rows, n_t)
            c = w @ np.asarray(clean[t], dtype=np.float64)
            role_sum[rows] += _percent(w @ np.asarray(role_inc[t], dtype=np.float64), c)
            set_sum[rows] += _percent(w @ np.asarray(random_inc[t], dtype=np.float64), c[:, None])
    return (role_sum - np.median(set_sum, axis=1)) / T


def _group_arrays(g: pd.DataFrame):
    """Per timestep of one (dataset, role, error) group: (role increases (n_t,), clean (n_t,),
    random increases (n_t, S)) on the images both the role and every set were run on."""
    inc = g["err_ablated"].to_numpy(np.float64) - g["err_clean"].to_numpy(np.float64)
    g = g.assign(_inc=inc)
    role = g[g["control"] == "role"].set_index(["timestep", "image"])
    rand = g[g["control"] == "random"].pivot_table(index=["timestep", "image"], columns="rep", values="_inc",
                                                   aggfunc="mean", observed=True)
    units = role.index.intersection(rand.index).sort_values() if len(rand) else role.index[:0]
    rand = rand.loc[units].dropna(axis=1)  # a set missing on some unit is no control of the role there
    if not rand.shape[1]:
        return []
    role = role.loc[units]
    out = []
    for t in units.get_level_values("timestep").unique():
        out.append((role.loc[t, "_inc"].to_numpy(), role.loc[t, "err_clean"].to_numpy(), rand.loc[t].to_numpy()))
    return out


def role_validation(role_ablations: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> pd.DataFrame:
    """Does ablating a role's heads hurt its error MORE than ablating layer-matched random heads?

    Per (dataset, role, error_name), over the timesteps and images ablated, the degradation of a
    head set is D = mean over timesteps of 100 x (mean increase err_ablated - err_clean) / (mean
    clean error) at that timestep, so timesteps whose clean errors differ weigh alike. Columns:
    - n_timesteps, n_units ((timestep, image) pairs), n_sets (random sets: control "random", one
      rep each; 0 when no layer-matched set exists);
    - role_degradation, random_median (median of the sets' D), random_q95 (their 95th percentile);
    - difference = role_degradation - random_median, with ci_low / ci_high: the percentile
      interval of ``hierarchical_bootstrap`` (timesteps, then images within them);
    - direction: "role > random", the one-sided alternative the p tests;
    - p_rank = (1 + #{sets with D >= role's}) / (1 + n_sets), D closer than 1e-4 percentage points
      counting as ties (against the role); p_floor = 1 / (1 + n_sets), the smallest p n_sets allow;
    - p_holm: Holm-adjusted p_rank across roles within (dataset, error_name).
    Group i (sorted keys) bootstraps with seed + i.
    """
    cols = ["dataset", "role", "error_name", "n_timesteps", "n_units", "n_sets", "role_degradation", "random_median",
            "random_q95", "difference", "ci_low", "ci_high", "direction", "p_rank", "p_floor", "p_holm"]
    if role_ablations is None or role_ablations.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    groups = role_ablations.groupby(["dataset", "role", "error_name"], sort=True, observed=True)
    for i, ((ds, role, err), g) in enumerate(groups):
        steps = _group_arrays(g)
        n_units = sum(len(r) for r, _, _ in steps)
        n_sets = steps[0][2].shape[1] if steps else 0
        row = {"dataset": ds, "role": role, "error_name": err, "n_timesteps": len(steps), "n_units": n_units,
               "n_sets": n_sets, "direction": "role > random"}
        if not steps:  # the role's ablation alone (no layer-matched set): its degradation, no test
            r = g[g["control"] == "role"]
            inc = (r["err_ablated"] - r["err_clean"]).groupby(r["timestep"]).sum()
            d_role = _percent(inc, r.groupby("timestep")["err_clean"].sum()).mean() if len(r) else math.nan
            row.update(n_timesteps=int(r["timestep"].nunique()), n_units=len(r), role_degradation=float(d_role))
            rows.append(row)
            continue
        d_role = float(np.mean([_percent(r.sum(), c.sum()) for r, c, _ in steps]))
        d_sets = np.mean([_percent(x.sum(axis=0), c.sum()) for _, c, x in steps], axis=0)  # (S,)
        reps = hierarchical_bootstrap(*zip(*steps), n_resamples=n_resamples, seed=seed + i) if n_resamples else None
        alpha = (1 - confidence) / 2
        row.update(role_degradation=d_role, random_median=float(np.median(d_sets)),
                   random_q95=float(np.quantile(d_sets, 0.95)), difference=d_role - float(np.median(d_sets)),
                   ci_low=float(np.quantile(reps, alpha)) if reps is not None else math.nan,
                   ci_high=float(np.quantile(reps, 1 - alpha)) if reps is not None else math.nan,
                   p_rank=(1 + int((d_sets >= d_role - _TIE).sum())) / (1 + n_sets), p_floor=1 / (1 + n_sets))
        rows.append(row)
    out = pd.DataFrame(rows).reindex(columns=cols)
    out["p_holm"] = out.groupby(["dataset", "error_name"], sort=False)["p_rank"].transform(
        lambda p: significance.holm(p.to_numpy()))
    return out
