"""``summarise(out_dir)``: the study's summary, from the driver's saved tables only.

Reads whichever of these exist in ``out_dir`` (each optional; a missing table makes the keys
that need it null): aggregates, histograms, per_image, image_histograms, layers, features_maps,
ablations, role_ablations, circuit, circuit_resamples, circuit_eval, attribution (``.parquet``) and
meta.json. Writes ``summary.json``
(strict JSON: NaN and infinities become null; dict keys are strings) and returns the same
dict, so ``summarise(d) == json.load(open(d / "summary.json"))``. Deterministic for a given
seed. This is what ``diffcirc report DIR`` reruns.

Keys (definitions in ``metrics`` and ``roles``; "trained" is the studied model, "random" the
random-weights control):

- complexity_ratio: {value, ci_low, ci_high, p_value, cohens_d (natural minus synthetic image means
  over their pooled sd), n_synthetic, n_natural, confidence, source ("per_image", or "aggregates"
  when only those exist: no interval, no p-value, no effect size)}
- entropy_divergence: {per_timestep {t: pooled JS}, mean_diff {t: H_nat - H_syn}, min, max, null
  {per_timestep {t: {js, null_mean, null_q95, p_value}}, n_permutations, p_floor, n_beyond_null_q95,
  n_significant, n_timesteps} (image-label permutations, ``metrics.entropy_divergence_null``; null
  when there is no image_histograms table)}
- entropy: {entropy_mean, normalised_mean, by_dataset {dataset: {...}}} of the trained model
- roles: [{layer, head, role, roles, entropy_mean, entropy_sd, normalised, distance_rel}] (trained model)
- role_summary: [{role, n_heads, n_matching, entropy_mean, entropy_sd, normalised_mean (sd over heads),
  random_matching, random_heads, random_share, map_images, status}]: ``roles.role_summary`` of the
  trained model beside ``roles.rule_checks`` (status: informative | uninformative | under-powered |
  no control; unassigned has no status)
- role_validation: rows of ``roles.role_validation`` (one-sided rank p against layer-matched random
  head sets, hierarchical bootstrap interval of the difference to their median)
- degradation: {mode, min, max, top [{dataset, layer, head, timestep, mode, percent, ci_low,
  ci_high, loss_clean, delta_loss, p_value, p_holm, p_bh, family_size}], by_mode {mode: {min, max}},
  n_tests, n_significant_holm, n_significant_bh} -- range and top over the zero-ablation rows when there are any
- circuit: ``circuit.summarise_circuits``: {synthetic_size, natural_size, ratio, n_heads,
  final_degradation (selection split), selection_timestep, overlap {intersection, union, jaccard,
  heads} of the two datasets' circuits, curve {dataset: [{removed, size, degradation}]} (size vs
  threshold, from the trace), evaluation [{dataset, timestep, selected, n_removed, n_selection,
  n_heldout, selection_percent, heldout_percent, ci_low, ci_high, random_n, random_median,
  random_q05, random_q95, rank, p_value}] (null without circuit_eval), resamples {dataset: {n,
  sizes, jaccard_mean, jaccard_min, jaccard_max}} (null without circuit_resamples), ablation (zero |
  mean: how the removed heads were ablated; null without circuit_eval)}
- attribution_spearman: {rho, p_value, n (signed agreement: -score against the degradation percent),
  magnitude {rho, p_value, n} (|score| against |percent|), per_group [{dataset, timestep, rho,
  p_value, n, rho_magnitude, p_magnitude}], integrated {rho, p_value, n, magnitude} (the same with the
  integrated-gradient scores, null without a score_ig column)} (``metrics.attribution_agreement``)
- controls: {by_control, framing}: by_control is ``metrics.matched_controls`` of the
  controls_per_image table, {control: {kind (matched | exposure), pooled, by_timestep [{timestep,
  ...}]}}, each row with the natural/control ratio test
  (value, ci_low, ci_high, p_value, p_floor, cohens_d, cohens_d_ci_low, cohens_d_ci_high),
  synthetic_ratio {value, ci_low, ci_high} and share {value, ci_low, ci_high} (explained for a
  matched control, relative for the exposure one), n_control, n_synthetic; framing [{set, x, y, width, height,
  size}] (the face boxes, ``controls.framing_set``; null without the framing control); null without
  controls_per_image
- random_control: {complexity_ratio, entropy, entropy_divergence, roles (role summary)}
- meta (meta.json as written by the driver), tables (the tables found), settings
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import metrics
from .circuit import summarise_circuits
from .roles import RoleRules, role_summary, role_validation, roles_by_model, rule_checks
from ..files import read_table, write_json

__all__ = ["TABLES", "read_table", "read_meta", "summarise", "json_safe"]

TABLES = ("aggregates", "histograms", "per_image", "image_histograms", "layers", "features_maps", "ablations",
          "role_ablations", "circuit", "circuit_resamples", "circuit_eval", "attribution", "controls_per_image",
          "controls_framing", "maps")
SUMMARY_FILE = "summary.json"


def read_meta(out_dir) -> Optional[dict]:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def json_safe(obj):
    """obj with numpy/pandas values turned into plain Python, NaN/inf into None, dict keys into str."""
    if isinstance(obj, dict):
        return {str(json_safe(k)) if not isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, pd.DataFrame):
        return json_safe(obj.to_dict("records"))
    if isinstance(obj, (list, tuple, set, frozenset, np.ndarray, pd.Series)):
        return [json_safe(v) for v in (sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (pd.Timestamp,)):
        return obj.isoformat()
    return obj


def _per_timestep(frame: pd.DataFrame, col: str) -> dict:
    return {str(int(t)): v for t, v in zip(frame["timestep"], frame[col].astype(float))}


def _entropy_overview(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame], model: str) -> Optional[dict]:
    prof = metrics.entropy_profile(aggregates, layers)
    if "model" in prof.columns:
        prof = prof[prof["model"] == model]
    if prof.empty:
        return None
    by_ds = prof.groupby("dataset", sort=True)[["entropy_mean", "normalised"]].mean()
    return {
        "entropy_mean": float(prof["entropy_mean"].mean()),
        "normalised_mean": float(prof["normalised"].mean()),
        "by_dataset": {ds: {"entropy_mean": float(r["entropy_mean"]), "normalised_mean": float(r["normalised"])}
                       for ds, r in by_ds.iterrows()},
    }


def _divergence(histograms, aggregates, image_histograms, model: str, n_resamples: int, seed: int) -> Optional[dict]:
    if histograms is None or histograms.empty:
        return None
    if "model" in histograms.columns and not (histograms["model"] == model).any():
        return None
    d = metrics.entropy_divergence(histograms, aggregates, model=model)
    if d["per_timestep"].empty:
        return None
    out = {"per_timestep": _per_timestep(d["per_timestep"], "js"),
           "mean_diff": _per_timestep(d["per_timestep"], "mean_diff"),
           "min": d["min"], "max": d["max"], "null": None}
    if image_histograms is not None and not image_histograms.empty and n_resamples > 0:
        null = metrics.entropy_divergence_null(image_histograms, model=model, n_permutations=n_resamples, seed=seed)
        if len(null):
            out["null"] = {"per_timestep": {str(int(r.timestep)): {"js": r.js, "null_mean": r.null_mean,
                                                                   "null_q95": r.null_q, "p_value": r.p}
                                            for r in null.itertuples()},
                           "n_permutations": int(n_resamples), "p_floor": 1.0 / (n_resamples + 1),
                           "n_beyond_null_q95": int((null["js"] > null["null_q"]).sum()),
                           "n_significant": int((null["p"] < 0.05).sum()), "n_timesteps": int(len(null))}
    return out


def _complexity(per_image, aggregates, n_resamples: int, seed: int, model: str, control: Optional[str]):
    if per_image is not None and not per_image.empty and (
            "model" not in per_image.columns or (per_image["model"] == model).any()):
        out = metrics.complexity_ratio(per_image, model, n_resamples=n_resamples, seed=seed, control=control)
        out["source"] = "per_image"
        if out.get("random_control") is not None:
            out["random_control"]["source"] = "per_image"
        return out
    if aggregates is not None and not aggregates.empty and (
            "model" not in aggregates.columns or (aggregates["model"] == model).any()):
        value = metrics.complexity_ratio_point(aggregates, model)
        return {"value": value, "ci_low": None, "ci_high": None, "p_value": None, "cohens_d": None,
                "source": "aggregates"}
    return None


def _controls(per_image, control_per_image, framing, n_resamples: int, seed: int) -> Optional[dict]:
    if per_image is None or per_image.empty or control_per_image is None or control_per_image.empty:
        return None
    out = metrics.matched_controls(per_image, control_per_image, metrics.CONTROL_KINDS, n_resamples=n_resamples, seed=seed)
    if not out:
        return None
    return {"by_control": out, "framing": framing if framing is not None and len(framing) else None}


def summarise(out_dir, n_resamples: int = 2000, seed: int = 0, rules: Optional[RoleRules] = None,
              top: int = 10, write: bool = True) -> dict:
    """Build (and by default write as ``out_dir/summary.json``) the summary of a run.

    Keys: complexity_ratio, controls, entropy_divergence, entropy, roles, role_summary, role_validation,
    degradation, circuit, attribution_spearman, random_control, meta, tables, settings (module
    docstring). ``n_resamples`` and ``seed`` drive every bootstrap
    and permutation test; ``top`` is the number of most-degrading heads listed.
    """
    out_dir = Path(out_dir)
    rules = rules or RoleRules()
    t = {name: read_table(out_dir, name) for name in TABLES if name != "maps"}  # maps: only the report draws them
    agg = t["aggregates"]
    layers = metrics.complete_layers(t["layers"], t["histograms"])
    has_agg = agg is not None and not agg.empty
    models = set(agg["model"]) if has_agg and "model" in agg.columns else set()
    summary: dict = {"tables": [n for n in TABLES if (out_dir / f"{n}.parquet").is_file()]}

    summary["complexity_ratio"] = _complexity(t["per_image"], agg, n_resamples, seed, "trained", "random")
    control_ratio = None
    if summary["complexity_ratio"] is not None:
        control_ratio = summary["complexity_ratio"].pop("random_control", None)
    if control_ratio is None and "random" in models:
        control_ratio = _complexity(None, agg, n_resamples, seed, "random", None)

    summary["controls"] = _controls(t["per_image"], t["controls_per_image"], t["controls_framing"], n_resamples, seed)
    summary["entropy_divergence"] = _divergence(t["histograms"], agg, t["image_histograms"], "trained", n_resamples,
                                                seed)
    summary["entropy"] = _entropy_overview(agg, layers, "trained") if has_agg else None

    by_model = roles_by_model(agg, layers, t["features_maps"], rules) if has_agg else {}
    trained_roles = by_model.get("trained")
    if trained_roles is not None and len(trained_roles):
        summary["roles"] = [
            {"layer": r.layer, "head": r.head, "role": r.role, "roles": list(r.roles), "entropy_mean": r.entropy,
             "entropy_sd": r.entropy_sd, "normalised": r.normalised, "distance_rel": r.distance_rel}
            for r in trained_roles.itertuples(index=False)]
        checks = rule_checks(trained_roles, by_model.get("random"), rules).drop(columns="n_matching")
        summary["role_summary"] = role_summary(trained_roles, rules).merge(checks, on="role", how="left")
    else:
        summary["roles"] = summary["role_summary"] = None
    ra = t["role_ablations"]
    summary["role_validation"] = (role_validation(ra, n_resamples=n_resamples, seed=seed)
                                  if ra is not None and not ra.empty else None)

    abl = t["ablations"]
    deg = metrics.degradation(abl, n_resamples=n_resamples, seed=seed) if abl is not None and not abl.empty else None
    if deg is not None and len(deg):
        rng = metrics.degradation_range(deg, mode="zero", top=top)
        keep = ["dataset", "layer", "head", "timestep", "mode", "percent", "ci_low", "ci_high", "loss_clean",
                "delta_loss", "p_value", "p_holm", "p_bh", "family_size"]
        rng["top"] = [{k: row[k] for k in keep} for row in rng["top"]]
        rng["by_mode"] = {m: {"min": float(g["percent"].min()), "max": float(g["percent"].max())}
                          for m, g in deg.groupby("mode", sort=True)}
        fam = deg if rng["mode"] is None else deg[deg["mode"] == rng["mode"]]
        rng["n_tests"] = int(len(fam))
        rng["n_significant_holm"] = int((fam["p_holm"] < 0.05).sum())
        rng["n_significant_bh"] = int((fam["p_bh"] < 0.05).sum())
        summary["degradation"] = rng
    else:
        summary["degradation"] = None

    summary["circuit"] = summarise_circuits(t["circuit"], t["circuit_eval"], t["circuit_resamples"],
                                            n_resamples=n_resamples, seed=seed)

    att = t["attribution"]
    if att is not None and not att.empty and deg is not None and len(deg):
        a = metrics.attribution_agreement(att, deg, "signed")
        m = metrics.attribution_agreement(att, deg, "magnitude")
        per_group = a["per_group"].merge(
            m["per_group"][["dataset", "timestep", "rho", "p_value"]].rename(
                columns={"rho": "rho_magnitude", "p_value": "p_magnitude"}), on=["dataset", "timestep"], how="left")
        summary["attribution_spearman"] = {"rho": a["rho"], "p_value": a["p_value"], "n": a["n"],
                                           "magnitude": {"rho": m["rho"], "p_value": m["p_value"], "n": m["n"]},
                                           "per_group": per_group, "integrated": None}
        if "score_ig" in att.columns:
            ig = metrics.attribution_agreement(att, deg, "signed", score="score_ig")
            ig_m = metrics.attribution_agreement(att, deg, "magnitude", score="score_ig")
            summary["attribution_spearman"]["integrated"] = {
                "rho": ig["rho"], "p_value": ig["p_value"], "n": ig["n"],
                "magnitude": {"rho": ig_m["rho"], "p_value": ig_m["p_value"], "n": ig_m["n"]}}
    else:
        summary["attribution_spearman"] = None

    if "random" in models or control_ratio is not None:
        control_roles = by_model.get("random")
        summary["random_control"] = {
            "complexity_ratio": control_ratio,
            "entropy": _entropy_overview(agg, layers, "random") if has_agg else None,
            "entropy_divergence": _divergence(t["histograms"], agg, t["image_histograms"], "random", n_resamples,
                                              seed),
            "roles": role_summary(control_roles, rules) if control_roles is not None else None,
        }
    else:
        summary["random_control"] = None

    summary["meta"] = read_meta(out_dir)
    summary["settings"] = {"n_resamples": n_resamples, "seed": seed, "top": top, "rules": asdict(rules)}
    summary = json_safe(summary)
    if write:
        write_json(summary, out_dir / SUMMARY_FILE, allow_nan=False)
    return summary
