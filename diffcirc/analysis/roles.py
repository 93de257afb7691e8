"""Functional head roles: transparent, configurable rules on per-head features.

Roles are hypotheses about what a head does, read off its attention statistics; the study tests
each by ablating the role's heads against size-matched random heads (``role_validation``).

Features (``head_features``, one row per (layer, head) of one model):

- ``entropy``, ``entropy_sd``: mean and population sd of the head's per-query entropy (nats)
  over all queries of all images, timesteps and datasets (the aggregates merged exactly,
  Chan et al.), so the two describe the same distribution.
- ``normalised``: entropy / ln n_keys (needs ``layers``).
- ``distance``: mean attention distance (token grids mapped to [0, 1]^2; uniform attention from
  the centre of a square grid gives about 0.38, a head attending to its own token 0).
- ``label_mass_lift``: mean same-label attention mass / the mass uniform attention would give
  (stat "label_mass_uniform"); 1 = no preference for the query's own part. NaN when the
  driver did not record the uniform expectation.
- ``edge_corr``, ``texture_corr``: mean over datasets and timesteps of the correlation of the
  head's per-query entropy map with the clean image's edge-magnitude / texture-energy map
  (``features_maps``). Optional ``foreground_corr`` (entropy map vs foreground mask) is used
  when that column exists.
- ``timestep_sensitivity``: spread over timesteps of H_t (H averaged over datasets) divided by
  its mean; spread = max - min ("range", default) or the sd ("sd").
- ``dataset_sensitivity``: |H_natural - H_synthetic| / mean(H_natural, H_synthetic), each H
  averaged over timesteps.

Rules (thresholds in ``RoleRules``; a NaN feature never satisfies a rule):

==========================  ===============================================================
edge_detection              edge_corr >= edge_corr_min
texture_analysis            texture_corr >= texture_corr_min
semantic_grouping           label_mass_lift >= semantic_lift_min
foreground_background       |foreground_corr| >= foreground_corr_min when that feature exists,
                            else fgbg_lift_min <= label_mass_lift < semantic_lift_min
global_layout               distance >= global_distance_min and normalised >= global_normalised_min
local_smoothing             distance <= local_distance_max and normalised >= local_normalised_min
timestep_gated              timestep_sensitivity >= timestep_sensitivity_min
dataset_adaptive            dataset_sensitivity >= dataset_sensitivity_min
==========================  ===============================================================

The primary ``role`` is the first matching rule in ``RoleRules.priority`` (evidence tied to
image content first, then attention geometry, then sensitivity), else "unassigned"; ``roles``
lists every matching rule in priority order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from . import significance

__all__ = ["ROLES", "ROLE_LABELS", "UNASSIGNED", "RoleRules", "head_features", "assign_roles", "role_summary",
           "roles_by_model", "role_validation"]

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
FEATURES = ("entropy", "entropy_sd", "normalised", "distance", "label_mass", "label_mass_uniform", "label_mass_lift",
            "edge_corr", "texture_corr", "foreground_corr", "timestep_sensitivity", "dataset_sensitivity")


@dataclass(frozen=True)
class RoleRules:
    """Thresholds of the role rules (see the module docstring for the rules themselves)."""

    edge_corr_min: float = 0.3
    """edge_detection: minimum correlation of the entropy map with the image's edge magnitude."""
    texture_corr_min: float = 0.3
    """texture_analysis: minimum correlation of the entropy map with the image's texture energy."""
    semantic_lift_min: float = 1.5
    """semantic_grouping: minimum same-part attention mass relative to uniform attention."""
    fgbg_lift_min: float = 1.15
    """foreground_background (without foreground_corr): lift at least this and below semantic_lift_min."""
    foreground_corr_min: float = 0.3
    """foreground_background (with foreground_corr): minimum |correlation| with the foreground mask."""
    global_distance_min: float = 0.3
    """global_layout: minimum mean attention distance (unit image square)."""
    global_normalised_min: float = 0.7
    """global_layout: minimum normalised entropy (attention spread over much of the image)."""
    local_distance_max: float = 0.1
    """local_smoothing: maximum mean attention distance."""
    local_normalised_min: float = 0.1
    """local_smoothing: minimum normalised entropy (a spread over neighbours, not a copy of one token)."""
    timestep_sensitivity_min: float = 0.2
    """timestep_gated: minimum spread of H over timesteps relative to its mean."""
    dataset_sensitivity_min: float = 0.1
    """dataset_adaptive: minimum |H_nat - H_syn| relative to their mean."""
    timestep_spread: str = "range"
    """How timestep sensitivity measures spread over timesteps: "range" (max - min) or "sd"."""
    priority: tuple = ("semantic_grouping", "foreground_background", "edge_detection", "texture_analysis",
                       "local_smoothing", "global_layout", "timestep_gated", "dataset_adaptive")
    """Order in which rules are tried for the primary role (every name in ROLES, each once)."""

    def __post_init__(self):
        if sorted(self.priority) != sorted(ROLES):
            raise ValueError(f"priority must order exactly the roles {list(ROLES)}, got {list(self.priority)}")
        if self.timestep_spread not in ("range", "sd"):
            raise ValueError(f"timestep_spread must be 'range' or 'sd', got {self.timestep_spread!r}")


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


def head_features(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame] = None,
                  features_maps: Optional[pd.DataFrame] = None, model: str = "trained",
                  timestep_spread: str = "range", datasets: tuple = ("synthetic", "natural")) -> pd.DataFrame:
    """One row per (layer, head) of ``model`` with the features in the module docstring, plus
    kind and n_keys when ``layers`` is given. Missing inputs give NaN features."""
    agg = _select_model(aggregates, model)
    ent = agg[agg["stat"] == "entropy"]
    pooled = _pooled(ent)
    out = pd.DataFrame({"entropy": pooled["mean"], "entropy_sd": pooled["sd"]})

    for stat in ("distance", "label_mass", "label_mass_uniform"):
        s = agg[agg["stat"] == stat]
        out[stat] = _pooled(s)["mean"].reindex(out.index) if len(s) else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = out["label_mass"] / out["label_mass_uniform"]
    out["label_mass_lift"] = lift.where(np.isfinite(lift))

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

    for col in ("edge_corr", "texture_corr", "foreground_corr"):
        out[col] = np.nan
    if features_maps is not None and len(features_maps):
        fm = _select_model(features_maps, model)
        cols = [c for c in ("edge_corr", "texture_corr", "foreground_corr") if c in fm.columns]
        if cols and len(fm):
            means = fm.groupby(["layer", "head"], sort=True)[cols].mean()
            for c in cols:
                out[c] = means[c].reindex(out.index)

    out = out.reset_index()
    if layers is not None and len(layers):
        info = layers.drop_duplicates("layer").set_index("layer")
        out["kind"] = out["layer"].map(info["kind"]) if "kind" in info.columns else None
        out["n_keys"] = out["layer"].map(pd.to_numeric(info["n_keys"], errors="coerce")).astype(np.float64)
    else:
        out["kind"] = None
        out["n_keys"] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        log_keys = np.log(out["n_keys"].to_numpy(dtype=np.float64))
        out["normalised"] = np.where(log_keys > 0, out["entropy"].to_numpy() / log_keys, np.nan)
    out.insert(0, "model", model)
    return out[["model", "layer", "head", "kind", "n_keys", *FEATURES]]


def _rule_masks(f: pd.DataFrame, r: RoleRules) -> dict:
    def col(name):
        return f[name].to_numpy(dtype=np.float64) if name in f.columns else np.full(len(f), np.nan)

    with np.errstate(invalid="ignore"):
        lift, dist, norm = col("label_mass_lift"), col("distance"), col("normalised")
        fg = col("foreground_corr")
        fgbg = np.where(np.isfinite(fg), np.abs(fg) >= r.foreground_corr_min,
                        (lift >= r.fgbg_lift_min) & (lift < r.semantic_lift_min))
        return {
            "edge_detection": col("edge_corr") >= r.edge_corr_min,
            "texture_analysis": col("texture_corr") >= r.texture_corr_min,
            "semantic_grouping": lift >= r.semantic_lift_min,
            "foreground_background": fgbg,
            "global_layout": (dist >= r.global_distance_min) & (norm >= r.global_normalised_min),
            "local_smoothing": (dist <= r.local_distance_max) & (norm >= r.local_normalised_min),
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


def roles_by_model(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame] = None,
                   features_maps: Optional[pd.DataFrame] = None, rules: Optional[RoleRules] = None,
                   models: tuple = ("trained", "random")) -> dict:
    """{model: assign_roles(head_features(...))} for each model present in ``aggregates``, with
    the same rules, so the trained model's roles can be set beside the random-weights control's."""
    rules = rules or RoleRules()
    present = set(aggregates["model"]) if "model" in aggregates.columns else {models[0]}
    return {m: assign_roles(head_features(aggregates, layers, features_maps, m, rules.timestep_spread), rules)
            for m in models if m in present}


# Relative size (of the clean error) below which two error increases are float32 rounding apart.
_TIE = 1e-6


def role_validation(role_ablations: pd.DataFrame, n_resamples: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Does ablating a role's heads hurt its role-relevant error more than ablating as many random heads?

    Per (dataset, role, error_name), over the images and timesteps ablated (unit: a (timestep,
    image) pair; increase = err_ablated - err_clean):
    - role_increase: mean increase when the role's heads are ablated (control "role");
    - random_increase: mean increase for the size-matched random head sets (control "random"),
      averaged over reps; role_percent / random_percent: the same as 100 x increase / mean clean;
    - ratio: role_increase / random_increase; n_units, n_reps;
    - p_value: paired sign-flip permutation test of role vs the per-unit mean over random reps;
    - p_mannwhitney: Mann-Whitney U of role increases vs all random (rep, unit) increases;
    - p_rank: (1 + #{reps with mean increase >= role's}) / (1 + n_reps), one-sided; increases closer
      than 1e-6 of the clean error count as ties;
    - p_holm: Holm-adjusted p_value across roles within (dataset, error_name).
    Group i (sorted keys) uses seed + i.
    """
    cols = ["dataset", "role", "error_name", "n_units", "n_reps", "role_increase", "random_increase", "role_percent",
            "random_percent", "ratio", "p_value", "p_mannwhitney", "p_rank", "p_holm"]
    if role_ablations is None or role_ablations.empty:
        return pd.DataFrame(columns=cols)
    df = role_ablations.assign(_inc=role_ablations["err_ablated"] - role_ablations["err_clean"])
    if "rep" not in df.columns:
        df["rep"] = 0
    rows = []
    for i, ((ds, role, err), g) in enumerate(df.groupby(["dataset", "role", "error_name"], sort=True)):
        unit = ["timestep", "image"]
        r = g[g["control"] == "role"].groupby(unit, sort=True)[["_inc", "err_clean"]].mean()
        c = g[g["control"] == "random"]
        c_unit = c.groupby(unit, sort=True)["_inc"].mean()
        c_rep = c.groupby("rep", sort=True)["_inc"].mean()
        role_inc = float(r["_inc"].mean()) if len(r) else math.nan
        rand_inc = float(c_rep.mean()) if len(c_rep) else math.nan
        clean = float(r["err_clean"].mean()) if len(r) else math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            role_pct = 100.0 * role_inc / clean if clean else math.nan
            rand_pct = 100.0 * rand_inc / clean if clean else math.nan
            ratio = role_inc / rand_inc if rand_inc else math.nan
        joined = r["_inc"].to_frame("role").join(c_unit.rename("random"), how="inner")
        if len(joined):
            p_perm = significance.permutation_test(joined["role"], joined["random"], paired=True, n_resamples=n_resamples,
                                            seed=seed + i).p_value
        else:
            p_perm = math.nan
        p_mw = significance.mann_whitney(r["_inc"], c["_inc"]).p_value if len(r) and len(c) else math.nan
        # increases within float32 rounding of each other are ties (counted against the role)
        tie = _TIE * abs(clean) if clean == clean else 0.0
        p_rank = (1 + int((c_rep >= role_inc - tie).sum())) / (1 + len(c_rep)) if len(c_rep) and len(r) else math.nan
        rows.append((ds, role, err, len(r), int(c_rep.size), role_inc, rand_inc, role_pct, rand_pct, ratio, p_perm,
                     p_mw, p_rank))
    out = pd.DataFrame(rows, columns=cols[:-1])
    out["p_holm"] = out.groupby(["dataset", "error_name"], sort=False)["p_value"].transform(
        lambda p: significance.holm(p.to_numpy()))
    return out
