"""Role rules on crafted feature tables; features from aggregates; role validation."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from diffcirc.analysis.roles import (ROLES, UNASSIGNED, RoleRules, assign_roles, head_features, role_summary,
                                     role_validation, roles_by_model)

NEUTRAL = {"entropy": 2.0, "normalised": 0.5, "distance": 0.2, "label_mass_lift": 1.0, "edge_corr": 0.0,
           "texture_corr": 0.0, "timestep_sensitivity": 0.0, "dataset_sensitivity": 0.0}
CRAFTED = {
    "edge_detection": {"edge_corr": 0.5},
    "texture_analysis": {"texture_corr": 0.5, "entropy": 4.16},
    "semantic_grouping": {"label_mass_lift": 2.0},
    "foreground_background": {"label_mass_lift": 1.3},
    "global_layout": {"distance": 0.4, "normalised": 0.9},
    "local_smoothing": {"distance": 0.05, "normalised": 0.3},
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
                rows.append({**base, "stat": "label_mass", "mean": 0.6, "std": 0.0, "m2": 0.0})
                if with_uniform:
                    rows.append({**base, "stat": "label_mass_uniform", "mean": 0.3, "std": 0.0, "m2": 0.0})
    return pd.DataFrame(rows), raw


def test_head_features_from_aggregates():
    agg, raw = _aggregates()
    layers = pd.DataFrame({"layer": ["a"], "kind": ["self"], "heads": [1], "head_dim": [8], "n_keys": [64],
                           "grid_h": [8], "grid_w": [8]})
    maps = pd.DataFrame({"model": "trained", "dataset": ["synthetic", "natural"], "timestep": 10, "layer": "a",
                         "head": 0, "edge_corr": [0.2, 0.4], "texture_corr": [0.0, 0.1]})
    f = head_features(agg, layers, maps).iloc[0]
    allx = np.concatenate(raw["trained"])
    assert f["entropy"] == pytest.approx(allx.mean()) and f["entropy_sd"] == pytest.approx(allx.std())
    assert f["normalised"] == pytest.approx(allx.mean() / math.log(64)) and f["kind"] == "self"
    assert f["label_mass_lift"] == pytest.approx(2.0) and f["distance"] == pytest.approx(0.05)
    assert f["edge_corr"] == pytest.approx(0.3) and f["texture_corr"] == pytest.approx(0.05)
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
    assert math.isnan(head_features(agg).iloc[0]["label_mass_lift"])
    both = roles_by_model(agg)
    assert set(both) == {"trained", "random"} and (both["random"]["model"] == "random").all()
    assert "semantic_grouping" not in both["trained"].iloc[0]["roles"]


def test_role_validation_role_vs_random_controls():
    rows = []
    for role, role_factor in (("edge_detection", 2.0), ("texture_analysis", 1.1)):
        for i in range(10):
            clean = 1.0 + 0.05 * i
            rows.append(("natural", 5, role, "role", 0, i, "edge", clean, clean * role_factor))
            for rep in range(4):
                rows.append(("natural", 5, role, "random", rep, i, "edge", clean, clean * (1.1 + 0.01 * rep)))
    df = pd.DataFrame(rows, columns=["dataset", "timestep", "role", "control", "rep", "image", "error_name",
                                     "err_clean", "err_ablated"])
    v = role_validation(df, n_resamples=999).set_index("role")
    clean = np.mean(1.0 + 0.05 * np.arange(10))
    assert v.loc["edge_detection", "role_increase"] == pytest.approx(clean)
    assert v.loc["edge_detection", "role_percent"] == pytest.approx(100.0)
    assert v.loc["edge_detection", "random_increase"] == pytest.approx(clean * 0.115)
    assert v.loc["edge_detection", "p_value"] < 0.01 and v.loc["edge_detection", "p_rank"] == pytest.approx(1 / 5)
    assert v.loc["texture_analysis", "ratio"] < 1 and v.loc["texture_analysis", "p_rank"] == 1.0
    assert (v["n_units"] == 10).all() and (v["n_reps"] == 4).all()
    # 2^10 sign patterns > 999 resamples: both p at the randomised floor 2 / (999 + 1); Holm doubles each.
    np.testing.assert_allclose(v["p_value"], [0.002, 0.002])
    np.testing.assert_allclose(v["p_holm"], [0.004, 0.004])
    assert role_validation(df.iloc[:0]).empty


# Per-unit clean errors far apart, so pairing matters; no role increase ties a random one (Mann-Whitney).
CLEAN = np.array([1.0, 5.0, 10.0, 20.0, 40.0, 80.0])


def _validation_rows(role: str, error_name: str, delta) -> list:
    """One timestep, six images: two random reps raise each image's error by 0.11 and 0.09 of its clean
    error (unit mean 0.1), the role's heads by 0.1 of it plus ``delta`` (the paired difference)."""
    rows = []
    for i, (clean, d) in enumerate(zip(CLEAN, delta)):
        rows.append(("natural", 5, role, "role", 0, i, error_name, clean, clean + 0.1 * clean + d))
        rows += [("natural", 5, role, "random", rep, i, error_name, clean, clean + f * clean)
                 for rep, f in enumerate((0.11, 0.09))]
    return rows


def _sign_flip_p(d) -> float:
    """Exact two-sided p of the paired sign-flip null: every one of the 2^n sign patterns of d."""
    d = np.asarray(d, dtype=np.float64)
    null = (np.array(list(itertools.product((1.0, -1.0), repeat=d.size))) * d).mean(axis=1)
    observed, tol = d.mean(), 1e-9
    return min(1.0, 2 * min(np.mean(null >= observed - tol), np.mean(null <= observed + tol)))


DELTAS = {
    # (role, error): paired differences; hand counts of sign patterns at least as extreme per tail
    ("edge_detection", "edge"): [0.5, 0.3, -0.15, 0.4, 0.2, 0.6],        # {}, {-0.15} flipped: 2 of 64
    ("texture_analysis", "edge"): [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],        # only {}: 1 of 64
    ("semantic_grouping", "edge"): [-0.2, -0.1, 0.35, 0.4, 0.5, 0.6],   # {}, {-0.1}, {-0.2}, both: 4 of 64
    ("global_layout", "high_freq"): [0.3, -0.2, 0.15, -0.4, 0.5, 0.25],  # messy: enumerated
}


@pytest.fixture(scope="module")
def validation():
    rows = [r for (role, err), d in DELTAS.items() for r in _validation_rows(role, err, d)]
    df = pd.DataFrame(rows, columns=["dataset", "timestep", "role", "control", "rep", "image", "error_name",
                                     "err_clean", "err_ablated"])
    return role_validation(df, n_resamples=999).set_index("role")


def test_role_validation_p_is_the_paired_sign_flip_null(validation):
    # Unpaired (labels permuted over all 12 increases) these would be near 1: the clean errors' spread
    # swamps the differences.
    p = validation["p_value"]
    assert p["edge_detection"] == pytest.approx(2 * 2 / 64)
    assert p["texture_analysis"] == pytest.approx(2 * 1 / 64)
    assert p["semantic_grouping"] == pytest.approx(2 * 4 / 64)
    assert p["global_layout"] == pytest.approx(_sign_flip_p(DELTAS[("global_layout", "high_freq")]))
    assert p["global_layout"] == pytest.approx(
        st.permutation_test((np.array(DELTAS[("global_layout", "high_freq")]),), np.mean,
                            permutation_type="samples").pvalue)


def test_role_validation_mann_whitney_rank_and_holm_family(validation):
    for (role, _), d in DELTAS.items():
        role_inc = 0.1 * CLEAN + np.array(d)
        random_inc = np.concatenate([0.11 * CLEAN, 0.09 * CLEAN])
        want = st.mannwhitneyu(role_inc, random_inc, alternative="two-sided").pvalue
        assert validation.loc[role, "p_mannwhitney"] == pytest.approx(want), role
        # rep means 0.11 * 26 = 2.86 and 0.09 * 26 = 2.34 against the role's 2.6 + mean(d)
        above = int(0.11 * 26 >= 2.6 + np.mean(d)) + int(0.09 * 26 >= 2.6 + np.mean(d))
        assert validation.loc[role, "p_rank"] == pytest.approx((1 + above) / 3), role
    # Holm within (natural, edge): 1/32 x 3, 1/16 x 2, 1/8 x 1 -> 0.09375, 0.125, 0.125; global_layout is a
    # family of one (high_freq), so its p stays.
    holm_p = validation["p_holm"]
    assert holm_p["texture_analysis"] == pytest.approx(0.09375)
    assert holm_p["edge_detection"] == pytest.approx(0.125) and holm_p["semantic_grouping"] == pytest.approx(0.125)
    assert holm_p["global_layout"] == pytest.approx(validation.loc["global_layout", "p_value"])
