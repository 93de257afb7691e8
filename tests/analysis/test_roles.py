"""Role rules on crafted feature tables; features from aggregates; rule checks against the
random-weights model; layer-matched random sets; role validation (rank p, hierarchical bootstrap)."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from diffcirc.analysis.roles import (ROLES, UNASSIGNED, RoleRules, assign_roles, hierarchical_bootstrap,
                                     head_features, layer_matched_sets, role_set_seed, role_summary,
                                     role_validation, roles_by_model, rule_checks, uniform_distance)

NEUTRAL = {"entropy": 2.0, "normalised": 0.5, "distance_rel": 0.4, "label_mass_lift_parts": 1.0, "edge_corr": 0.0,
           "texture_corr": 0.0, "timestep_sensitivity": 0.0, "dataset_sensitivity": 0.0}
CRAFTED = {
    "edge_detection": {"edge_corr": 0.5},
    "texture_analysis": {"texture_corr": 0.5, "entropy": 4.16},
    "semantic_grouping": {"label_mass_lift_parts": 2.0},
    "foreground_background": {"label_mass_lift_parts": 1.3},
    "global_layout": {"distance_rel": 0.8, "normalised": 0.9},
    "local_smoothing": {"distance_rel": 0.1, "normalised": 0.3},
    "timestep_gated": {"timestep_sensitivity": 0.5},
    "dataset_adaptive": {"dataset_sensitivity": 0.3},
}


def _features(extra: dict = None) -> pd.DataFrame:
    rows = [{"layer": "l", "head": i, **NEUTRAL, **changes} for i, changes in enumerate(CRAFTED.values())]
    rows.append({"layer": "l", "head": len(rows), **NEUTRAL})
    rows.append({"layer": "l", "head": len(rows), **{k: np.nan for k in NEUTRAL}})
    rows.append({"layer": "l", "head": len(rows), **NEUTRAL, "edge_corr": 0.6, "timestep_sensitivity": 0.9})
    return pd.DataFrame(rows)


def test_each_rule_fires_on_its_crafted_head():
    out = assign_roles(_features())
    for i, role in enumerate(CRAFTED):
        assert out.loc[i, "role"] == role and out.loc[i, "roles"] == [role]
    neutral, nan, both = out.iloc[-3], out.iloc[-2], out.iloc[-1]
    assert neutral["role"] == nan["role"] == UNASSIGNED and neutral["roles"] == nan["roles"] == []
    assert both["role"] == "edge_detection" and both["roles"] == ["edge_detection", "timestep_gated"]


def test_priority_and_thresholds_are_configurable():
    f = _features()
    rules = RoleRules(priority=("timestep_gated", *[r for r in RoleRules().priority if r != "timestep_gated"]))
    assert assign_roles(f, rules).iloc[-1]["role"] == "timestep_gated"
    assert assign_roles(f, RoleRules(edge_corr_min=0.55)).loc[0, "role"] == UNASSIGNED
    with pytest.raises(ValueError, match="priority"):
        RoleRules(priority=("edge_detection",))
    with pytest.raises(ValueError, match="timestep_spread"):
        RoleRules(timestep_spread="iqr")


def test_foreground_rule_prefers_foreground_corr():
    f = _features().assign(foreground_corr=0.0)
    f.loc[0, "foreground_corr"] = -0.4  # also an edge head: foreground/background comes first
    out = assign_roles(f)
    assert out.loc[0, "role"] == "foreground_background"
    assert out.loc[3, "role"] == UNASSIGNED  # lift 1.3 no longer counts once the map correlation exists


def test_role_summary_mean_sd_over_heads():
    f = _features()
    f.loc[len(f) - 1, "texture_corr"] = 0.9  # second texture head (edge still first)
    f.loc[len(f)] = {"layer": "l", "head": 99, **NEUTRAL, "texture_corr": 0.4, "entropy": 4.24}
    s = role_summary(assign_roles(f)).set_index("role")
    assert list(s.index) == [*RoleRules().priority, UNASSIGNED]
    assert s.loc["texture_analysis", "n_heads"] == 2 and s.loc["texture_analysis", "n_matching"] == 3
    assert s.loc["texture_analysis", "entropy_mean"] == pytest.approx(4.2)
    assert s.loc["texture_analysis", "entropy_sd"] == pytest.approx(np.std([4.16, 4.24], ddof=1))
    assert math.isnan(s.loc["global_layout", "entropy_sd"]) and s.loc["global_layout", "n_heads"] == 1
    every = role_summary(assign_roles(f), by="roles").set_index("role")
    assert every.loc["texture_analysis", "n_heads"] == 3 and set(ROLES) <= set(every.index)


def _aggregates(with_uniform=True):
    rng = np.random.default_rng(0)
    rows, raw = [], {}
    for model in ("trained", "random"):
        for ds, scale in (("synthetic", 1.0), ("natural", 1.2)):
            for t, shift in ((10, 0.0), (20, 1.0)):
                x = rng.normal(2.0 * scale + shift, 0.3, 50)
                raw.setdefault(model, []).append(x)
                m2 = float(((x - x.mean()) ** 2).sum())
                base = {"model": model, "dataset": ds, "timestep": t, "layer": "a", "head": 0, "count": 50}
                rows.append({**base, "stat": "entropy", "mean": x.mean(), "std": x.std(ddof=1), "m2": m2})
                rows.append({**base, "stat": "distance", "mean": 0.05, "std": 0.0, "m2": 0.0})
                # parts (synthetic) lift 0.6 / 0.3 = 2, superpixels (natural) 0.45 / 0.3 = 1.5: pooled would be 1.75
                mass = 0.6 if ds == "synthetic" else 0.45
                rows.append({**base, "stat": "label_mass", "mean": mass, "std": 0.0, "m2": 0.0})
                if with_uniform:
                    rows.append({**base, "stat": "label_mass_uniform", "mean": 0.3, "std": 0.0, "m2": 0.0})
    return pd.DataFrame(rows), raw


def test_head_features_from_aggregates():
    agg, raw = _aggregates()
    layers = pd.DataFrame({"layer": ["a"], "kind": ["self"], "heads": [1], "head_dim": [8], "n_keys": [64],
                           "grid_h": [8], "grid_w": [8]})
    maps = pd.DataFrame({"model": "trained", "dataset": ["synthetic", "natural", "natural"], "timestep": [10, 10, 20],
                         "layer": "a", "head": 0, "edge_corr": [0.2, 0.4, 0.4], "texture_corr": [0.0, 0.1, 0.1],
                         "n_images": [4, 5, 5]})
    f = head_features(agg, layers, maps).iloc[0]
    allx = np.concatenate(raw["trained"])
    assert f["entropy"] == pytest.approx(allx.mean()) and f["entropy_sd"] == pytest.approx(allx.std())
    assert f["normalised"] == pytest.approx(allx.mean() / math.log(64)) and f["kind"] == "self"
    assert f["label_mass_lift_parts"] == pytest.approx(2.0) and f["label_mass_lift_superpixels"] == pytest.approx(1.5)
    assert f["distance"] == pytest.approx(0.05) and f["distance_rel"] == pytest.approx(0.05 / uniform_distance(8, 8))
    assert f["edge_corr"] == pytest.approx(1 / 3) and f["texture_corr"] == pytest.approx(0.2 / 3)
    assert f["map_images"] == 9  # 4 synthetic + 5 natural images, the natural ones counted once over timesteps
    cells = {(ds, t): x.mean() for (ds, t), x in zip([(d, t) for d in ("synthetic", "natural") for t in (10, 20)],
                                                      raw["trained"])}
    h_t = [np.mean([cells[("synthetic", t)], cells[("natural", t)]]) for t in (10, 20)]
    assert f["timestep_sensitivity"] == pytest.approx((h_t[1] - h_t[0]) / np.mean(h_t))
    h_d = [np.mean([cells[(d, 10)], cells[(d, 20)]]) for d in ("synthetic", "natural")]
    assert f["dataset_sensitivity"] == pytest.approx(abs(h_d[1] - h_d[0]) / np.mean(h_d))
    sd = head_features(agg, timestep_spread="sd").iloc[0]
    assert sd["timestep_sensitivity"] == pytest.approx(np.std(h_t) / np.mean(h_t))
    assert math.isnan(sd["normalised"]) and math.isnan(sd["edge_corr"])


def test_lift_is_nan_without_uniform_expectation_and_models_side_by_side():
    agg, _ = _aggregates(with_uniform=False)
    assert math.isnan(head_features(agg).iloc[0]["label_mass_lift_parts"])
    both = roles_by_model(agg)
    assert set(both) == {"trained", "random"} and (both["random"]["model"] == "random").all()
    assert "semantic_grouping" not in both["trained"].iloc[0]["roles"]




def test_uniform_distance_by_hand():
    # 1 x 2 grid: tokens at x = 1/4 and 3/4; of the 4 (query, key) pairs two are 1/2 apart
    assert uniform_distance(1, 2) == pytest.approx(0.25)
    # 2 x 2: of 16 pairs, 4 at 0, 8 at 1/2 (a side), 4 at sqrt(2)/2 (a diagonal)
    assert uniform_distance(2, 2) == pytest.approx((8 * 0.5 + 4 * math.sqrt(0.5)) / 16)
    # brute force on a 3 x 5 grid, and the continuous unit square's 0.5214 for a fine one
    g = np.array([((r + 0.5) / 3, (c + 0.5) / 5) for r in range(3) for c in range(5)])
    assert uniform_distance(3, 5) == pytest.approx(np.linalg.norm(g[:, None] - g[None], axis=-1).mean())
    assert uniform_distance(64, 64) == pytest.approx(0.5214, abs=2e-4)


def _random_model_features(n: int) -> pd.DataFrame:
    """n random-weights heads: near-uniform attention (distance about the uniform one, entropy near
    ln n_keys), map correlations that reach 0.35 on one head."""
    rows = [{"layer": "l", "head": i, **NEUTRAL, "distance_rel": 0.98, "normalised": 0.99, "edge_corr": 0.0}
            for i in range(n)]
    rows[0]["edge_corr"] = 0.35
    return pd.DataFrame(rows)


def test_rule_firing_on_random_weights_is_uninformative():
    trained = assign_roles(_features().assign(map_images=40.0))
    control = assign_roles(_random_model_features(24))
    checks = rule_checks(trained, control).set_index("role")
    # global layout fires on all 24 near-uniform random heads: uninformative whatever it finds
    assert checks.loc["global_layout", "random_matching"] == 24 and checks.loc["global_layout", "random_share"] == 1
    assert checks.loc["global_layout", "status"] == "uninformative"
    # edge detection fires on 1 of 24 random heads, with maps from 40 images: informative
    assert checks.loc["edge_detection", "random_matching"] == 1 and checks.loc["edge_detection", "status"] == "informative"
    assert checks.loc["semantic_grouping", "status"] == "informative"
    assert checks.loc["global_layout", "n_matching"] == 1
    # the share is configurable; at 1/24 edge detection is uninformative too
    assert rule_checks(trained, control, RoleRules(uninformative_share=1 / 24)).set_index("role").loc[
        "edge_detection", "status"] == "uninformative"


def test_map_rules_from_few_images_are_under_powered_and_no_control_is_said():
    trained = assign_roles(_features().assign(map_images=8.0))
    checks = rule_checks(trained, assign_roles(_random_model_features(4))).set_index("role")
    assert checks.loc["edge_detection", "status"] == "under-powered" and checks.loc["edge_detection", "map_images"] == 8
    assert checks.loc["texture_analysis", "status"] == "under-powered"
    assert checks.loc["semantic_grouping", "status"] == "informative"  # label rules read no maps
    unknown = rule_checks(assign_roles(_features()), None).set_index("role")  # no map_images column, no control
    assert unknown.loc["edge_detection", "status"] == "under-powered"
    assert unknown.loc["semantic_grouping", "status"] == "no control" and math.isnan(unknown.loc["semantic_grouping",
                                                                                                 "random_share"])


# -- layer-matched random sets ---------------------------------------------------------------------------

HEADS = [(layer, h) for layer, n in (("a", 4), ("b", 5), ("c", 3)) for h in range(n)]
ROLE = [("a", 0), ("a", 2), ("b", 4), ("c", 1)]


def _per_layer(heads) -> dict:
    out = {}
    for layer, _ in heads:
        out[layer] = out.get(layer, 0) + 1
    return out


def test_layer_matched_sets_match_counts_per_layer_and_exclude_the_role():
    sets = layer_matched_sets(HEADS, ROLE, 20, role_set_seed(0, "edge_detection"))
    # C(2, 2) x C(4, 1) x C(2, 1) = 8 sets exist, fewer than 20: every one of them
    assert len(sets) == 8 and len({tuple(s) for s in sets}) == 8
    for s in sets:
        assert _per_layer(s) == {"a": 2, "b": 1, "c": 1} and not set(s) & set(ROLE) and set(s) <= set(HEADS)
    assert {tuple(s) for s in sets} == {(("a", 1), ("a", 3), ("b", b), ("c", c)) for b in range(4) for c in (0, 2)}
    drawn = layer_matched_sets(HEADS, ROLE, 5, role_set_seed(0, "edge_detection"))
    assert len(drawn) == 5 and len({tuple(s) for s in drawn}) == 5 and {tuple(s) for s in drawn} <= {
        tuple(s) for s in sets}
    # layer a holds 3 role heads and 1 other: no set can match it
    assert layer_matched_sets(HEADS, [("a", 0), ("a", 1), ("a", 2)], 5, 0) == []
    with pytest.raises(ValueError, match="not heads of the model"):
        layer_matched_sets(HEADS, [("z", 0)], 5, 0)


def test_sets_depend_on_seed_and_role_only():
    big = [(layer, h) for layer in ("a", "b") for h in range(12)]
    role = [("a", 0), ("a", 1), ("b", 0)]
    draw = lambda seed, name: layer_matched_sets(big, role, 30, role_set_seed(seed, name))  # noqa: E731
    first = draw(7, "texture_analysis")
    assert len(first) == 30 and first == draw(7, "texture_analysis")  # recomputable alone
    assert first != draw(8, "texture_analysis") and first != draw(7, "edge_detection")


def test_role_sets_unchanged_when_ablation_timesteps_change():
    from types import SimpleNamespace

    from diffcirc.analysis.config import AnalysisConfig
    from diffcirc.analysis.phases import Experiment

    agg, _ = _aggregates()
    layers = pd.DataFrame({"layer": ["a"], "kind": ["self"], "heads": [6], "head_dim": [8], "n_keys": [64],
                           "grid_h": [8], "grid_w": [8]})
    six = pd.concat([agg.assign(head=h, mean=agg["mean"] * (1 + h)) for h in range(6)], ignore_index=True)
    six.loc[(six["stat"] == "distance") & (six["head"] >= 2), "mean"] = 0.3  # heads 0, 1: local smoothing
    six.loc[six["stat"] == "label_mass", "mean"] = 0.3  # no label lift (semantic grouping would come first)

    def conditions(ablation_timesteps):
        exp = SimpleNamespace(c=AnalysisConfig(ablation_timesteps=ablation_timesteps, role_control_reps=4, seed=3),
                              heads=[("a", h) for h in range(6)], tables={"aggregates": six, "layers": layers})
        return Experiment.role_conditions(exp)

    cond, tags = conditions([150, 450])
    assert cond == conditions([50, 950, 750])[0]
    local = [c for c, (role, control, _) in zip(cond, tags) if role == "local_smoothing" and control == "random"]
    # C(4, 2) = 6 sets of two heads outside {0, 1}: four of them drawn
    assert len(local) == 4 and all({(z.layer, z.head) for z in c}.isdisjoint({("a", 0), ("a", 1)}) for c in local)
    assert all(len(c) == 2 for c in local) and len({tuple((z.layer, z.head) for z in c) for c in local}) == 4


# -- validation --------------------------------------------------------------------------------------

def _ablation_rows(role_inc: dict, random_inc: dict, clean: dict) -> pd.DataFrame:
    """role_ablations rows of one (dataset, role, error): per timestep, per image, the role's increase
    and each random set's, on the given clean errors."""
    rows = []
    for t, c in clean.items():
        for i, ci in enumerate(c):
            rows.append(("natural", t, "edge_detection", "role", 0, i, "edge", ci, ci + role_inc[t][i]))
            rows += [("natural", t, "edge_detection", "random", s, i, "edge", ci, ci + x[i])
                     for s, x in enumerate(random_inc[t])]
    return pd.DataFrame(rows, columns=["dataset", "timestep", "role", "control", "rep", "image", "error_name",
                                       "err_clean", "err_ablated"])


def test_one_sided_rank_p_by_hand():
    # two timesteps, clean errors 1 + 1 (t = 10) and 10 + 10 (t = 20); per timestep D = 100 x sum inc / sum clean
    clean = {10: [1.0, 1.0], 20: [10.0, 10.0]}
    role = {10: [0.2, 0.2], 20: [2.0, 4.0]}                  # D: 20 and 30 -> 25 (over all units pooled: 29.1)
    sets = {10: [[0.1, 0.1], [0.3, 0.3], [0.2, 0.2], [0.0, 0.0], [0.6, 0.4]],
            20: [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [0.0, 0.0], [3.0, 3.0]]}
    # sets' D: (10 + 10) / 2 = 10, (30 + 20) / 2 = 25 (a tie), (20 + 20) / 2 = 20, 0, (50 + 30) / 2 = 40
    v = role_validation(_ablation_rows(role, sets, clean), n_resamples=200).iloc[0]
    assert v["role_degradation"] == pytest.approx(25.0) and v["random_median"] == pytest.approx(20.0)
    assert v["n_sets"] == 5 and v["n_units"] == 4 and v["n_timesteps"] == 2 and v["direction"] == "role > random"
    # sets at least as damaging as the role: 25 (tie), 40 -> (1 + 2) / (5 + 1)
    assert v["p_rank"] == pytest.approx(3 / 6) and v["p_floor"] == pytest.approx(1 / 6)
    assert v["difference"] == pytest.approx(5.0)
    # a role that hurts LESS than every set gets p = 1, not a small two-sided p
    weak = role_validation(_ablation_rows({10: [0.0, 0.0], 20: [-1.0, -1.0]}, sets, clean), n_resamples=0).iloc[0]
    assert weak["p_rank"] == pytest.approx(1.0) and math.isnan(weak["ci_low"])
    # one that hurts more than all five sits at the floor 1 / 6
    strong = role_validation(_ablation_rows({10: [1.0, 1.0], 20: [9.0, 9.0]}, sets, clean), n_resamples=0).iloc[0]
    assert strong["p_rank"] == pytest.approx(1 / 6)


def test_validation_without_matched_sets_and_holm_family():
    clean = {10: [1.0, 1.0, 1.0]}
    alone = _ablation_rows({10: [0.5, 0.5, 0.5]}, {10: []}, clean)
    v = role_validation(alone).iloc[0]
    assert v["n_sets"] == 0 and v["n_units"] == 3 and math.isnan(v["p_rank"]) and math.isnan(v["p_holm"])
    sets = {10: [[0.1] * 3, [0.2] * 3, [0.3] * 3]}
    a = _ablation_rows({10: [0.5] * 3}, sets, clean)                         # above all 3: p = 1/4
    b = _ablation_rows({10: [0.25] * 3}, sets, clean).assign(role="texture_analysis")  # above 2: p = 2/4
    v = role_validation(pd.concat([a, b]), n_resamples=0).set_index("role")
    assert v.loc["edge_detection", "p_rank"] == 0.25 and v.loc["texture_analysis", "p_rank"] == 0.5
    # Holm over the two roles of (natural, edge): 2 x 0.25, then max(0.5, 1 x 0.5)
    assert v.loc["edge_detection", "p_holm"] == 0.5 and v.loc["texture_analysis", "p_holm"] == 0.5
    assert role_validation(a.iloc[:0]).empty


def test_hierarchical_bootstrap_variance_matches_the_two_stage_formula():
    # One random set and clean errors of 100 everywhere: a replicate is the mean over T drawn timesteps,
    # each with its own image draw, of the mean paired difference d = role - set (in points). Its
    # variance is (1/T) [var over timesteps of their means + mean over timesteps of var_i(d) / n_t].
    rng = np.random.default_rng(1)
    d = [rng.normal(mu, sd, n) for mu, sd, n in ((0.0, 1.0, 6), (3.0, 2.0, 4), (1.0, 0.5, 8))]
    role = [x + 1.0 for x in d]
    sets = [np.ones((len(x), 1)) for x in d]
    clean = [np.full(len(x), 100.0) for x in d]
    reps = hierarchical_bootstrap(role, clean, sets, n_resamples=40000, seed=0)
    T = len(d)
    want = (np.var([x.mean() for x in d]) + np.mean([np.var(x) / len(x) for x in d])) / T
    assert reps.mean() == pytest.approx(np.mean([x.mean() for x in d]), abs=0.02)
    assert reps.var() == pytest.approx(want, rel=0.03)


def test_hierarchical_bootstrap_of_one_timestep_is_scipys_bootstrap():
    # one timestep: resampling images alone; the statistic D(role) - median of three sets' D
    rng = np.random.default_rng(2)
    n = 12
    clean = rng.uniform(0.5, 2.0, n)
    role = rng.uniform(0.0, 1.0, n)
    sets = rng.uniform(0.0, 0.6, (n, 3))

    def stat(idx):
        idx = idx.astype(int)
        c = clean[idx].sum()
        return 100 * role[idx].sum() / c - np.median(100 * sets[idx].sum(axis=0) / c)

    ours = hierarchical_bootstrap([role], [clean], [sets], n_resamples=20000, seed=0)
    theirs = st.bootstrap((np.arange(n, dtype=float),), stat, vectorized=False, n_resamples=20000,
                          method="percentile", random_state=0)
    lo, hi = np.quantile(ours, [0.025, 0.975])
    width = theirs.confidence_interval.high - theirs.confidence_interval.low
    assert lo == pytest.approx(theirs.confidence_interval.low, abs=0.05 * width)
    assert hi == pytest.approx(theirs.confidence_interval.high, abs=0.05 * width)
    assert ours.std() == pytest.approx(theirs.standard_error, rel=0.05)


def test_validation_interval_is_the_bootstraps_percentiles():
    clean = {10: [1.0, 2.0, 1.5], 20: [4.0, 5.0, 6.0]}
    role = {10: [0.5, 0.9, 0.6], 20: [2.0, 1.0, 3.0]}
    sets = {10: [[0.1, 0.2, 0.1], [0.3, 0.1, 0.2]], 20: [[1.0, 0.5, 0.2], [0.4, 0.8, 0.6]]}
    v = role_validation(_ablation_rows(role, sets, clean), n_resamples=500, seed=4).iloc[0]
    ts = sorted(clean)
    reps = hierarchical_bootstrap([np.array(role[t]) for t in ts], [np.array(clean[t]) for t in ts],
                                  [np.array(sets[t]).T for t in ts], n_resamples=500, seed=4)
    assert (v["ci_low"], v["ci_high"]) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    assert v["ci_low"] < v["difference"] < v["ci_high"]
