"""Metrics on constructed tables with known answers."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from scipy.spatial.distance import jensenshannon

from diffcirc.analysis import metrics

LN2 = math.log(2)


def _agg_row(model, ds, t, layer, head, stat, count, mean, m2):
    return {"model": model, "dataset": ds, "timestep": t, "layer": layer, "head": head, "stat": stat, "count": count,
            "mean": mean, "std": math.sqrt(m2 / (count - 1)), "m2": m2}


def test_entropy_profile_uniform_head():
    layers = pd.DataFrame({"layer": ["a", "b"], "kind": "self", "heads": 1, "head_dim": 8, "n_keys": [64, 16],
                           "grid_h": [8, 4], "grid_w": [8, 4]})
    agg = pd.DataFrame([_agg_row("trained", "synthetic", 10, "a", 0, "entropy", 100, math.log(64), 0.0),
                        _agg_row("trained", "synthetic", 10, "b", 0, "entropy", 100, 1.0, 4.0),
                        _agg_row("trained", "synthetic", 10, "b", 0, "distance", 100, 0.3, 1.0)])
    p = metrics.entropy_profile(agg, layers).set_index("layer")
    assert len(p) == 2
    assert p.loc["a", "normalised"] == pytest.approx(1.0) and p.loc["a", "effective_span"] == pytest.approx(64.0)
    assert p.loc["a", "entropy_sd"] == 0.0 and p.loc["b", "entropy_sd"] == pytest.approx(0.2)
    assert p.loc["b", "normalised"] == pytest.approx(1.0 / math.log(16))
    assert metrics.entropy_profile(agg)["normalised"].isna().all()


def test_js_divergence_known_values():
    assert metrics.js_divergence([1, 2, 3, 0], [10, 20, 30, 0]) == 0.0
    assert metrics.js_divergence([5, 0, 0], [0, 0, 7]) == pytest.approx(LN2)
    assert math.isnan(metrics.js_divergence([0, 0], [1, 1]))
    p, q = np.array([3.0, 1.0, 0.0, 6.0]), np.array([1.0, 1.0, 4.0, 2.0])
    assert metrics.js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2)
    batch = metrics.js_divergence(np.stack([p, p]), np.stack([q, p]))
    np.testing.assert_allclose(batch, [jensenshannon(p, q) ** 2, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.js_divergence([1, 2], [1, 2, 3])


def _hist(counts: dict, model="trained", timestep=10, layer="a"):
    """counts: {(dataset, head): [count per bin]}"""
    rows = []
    for (ds, head), c in counts.items():
        for b, n in enumerate(c):
            rows.append({"model": model, "dataset": ds, "timestep": timestep, "layer": layer, "head": head,
                         "stat": "entropy", "bin": b, "lo": b * 0.5, "hi": (b + 1) * 0.5, "count": n})
    return pd.DataFrame(rows)


def test_entropy_divergence_identical_and_disjoint():
    same = pd.concat([_hist({("synthetic", 0): [1, 4, 2], ("natural", 0): [2, 8, 4]}, timestep=t) for t in (1, 2)])
    d = metrics.entropy_divergence(same)
    assert d["min"] == d["max"] == 0.0 and (d["per_head"]["js"] == 0).all()
    # Per head: disjoint (ln 2); pooled over the layer's heads: identical (0) -- the documented pooling.
    crossed = _hist({("synthetic", 0): [9, 0], ("natural", 0): [0, 9], ("synthetic", 1): [0, 9], ("natural", 1): [9, 0]})
    d = metrics.entropy_divergence(crossed)
    np.testing.assert_allclose(d["per_head"]["js"], [LN2, LN2])
    assert d["per_layer"]["js"].tolist() == [0.0] and d["per_timestep"]["js"].tolist() == [0.0]


def test_entropy_divergence_averages_layers_and_reads_means():
    h = pd.concat([_hist({("synthetic", 0): [5, 0], ("natural", 0): [0, 5]}, layer="a"),
                   _hist({("synthetic", 0): [3, 3], ("natural", 0): [3, 3]}, layer="b"),
                   _hist({("synthetic", 0): [3, 3], ("natural", 0): [3, 3]}, model="random")])
    agg = pd.DataFrame([_agg_row("trained", "synthetic", 10, "a", 0, "entropy", 10, 1.0, 1.0),
                        _agg_row("trained", "natural", 10, "a", 0, "entropy", 10, 1.5, 1.0),
                        _agg_row("trained", "synthetic", 10, "b", 0, "entropy", 10, 2.0, 1.0),
                        _agg_row("trained", "natural", 10, "b", 0, "entropy", 10, 2.1, 1.0)])
    d = metrics.entropy_divergence(h, agg)
    assert d["per_timestep"]["js"].iloc[0] == pytest.approx(LN2 / 2)
    assert d["per_timestep"]["mean_diff"].iloc[0] == pytest.approx(0.3)
    assert d["per_head"].set_index("layer").loc["a", "mean_diff"] == pytest.approx(0.5)
    assert metrics.entropy_divergence(h, agg, model="random")["max"] == 0.0
    # A bin only one dataset has counts in is fine (outer join with zeros).
    one_sided = _hist({("synthetic", 0): [4, 4, 0], ("natural", 0): [4, 4]})
    assert metrics.entropy_divergence(one_sided)["max"] == 0.0


def _per_image(values: dict, model="trained"):
    """values: {dataset: per-image entropy list}; two heads and two timesteps, same value."""
    rows = []
    for ds, imgs in values.items():
        for i, v in enumerate(imgs):
            for t in (1, 2):
                for head in (0, 1):
                    rows.append({"model": model, "dataset": ds, "timestep": t, "image": i, "layer": "a",
                                 "head": head, "stat": "entropy", "mean": v + (0.1 if head else -0.1)})
    return pd.DataFrame(rows)


def test_complexity_ratio_identical_datasets_is_one():
    imgs = list(np.random.default_rng(0).uniform(2, 3, 10))
    r = metrics.complexity_ratio(_per_image({"synthetic": imgs, "natural": imgs}), n_resamples=499)
    assert r["value"] == pytest.approx(1.0) and r["ci_low"] <= 1.0 <= r["ci_high"] and r["p_value"] > 0.9
    assert r["random_control"] is None and r["n_synthetic"] == r["n_natural"] == 10


def test_complexity_ratio_shifted_with_control():
    rng = np.random.default_rng(1)
    syn = rng.uniform(2, 2.2, 12)
    nat = 1.1 * rng.uniform(2, 2.2, 12)
    frame = pd.concat([_per_image({"synthetic": syn, "natural": nat}),
                       _per_image({"synthetic": syn, "natural": syn}, model="random")])
    r = metrics.complexity_ratio(frame, n_resamples=999, seed=2)
    assert r["value"] == pytest.approx(nat.mean() / syn.mean()) and r["ci_low"] < r["value"] < r["ci_high"]
    assert r["p_value"] < 0.01
    assert r["random_control"]["value"] == pytest.approx(1.0)
    assert r == metrics.complexity_ratio(frame, n_resamples=999, seed=2)


def test_complexity_ratio_effect_size_p_and_interval_on_a_small_case():
    # Image means: natural 3, 4, 5 and synthetic 1, 2, 3 -> ratio 4 / 2; both sample variances are 1,
    # so the pooled sd is 1 and Cohen's d = (4 - 2) / 1, positive because natural is the higher.
    # Of the C(6, 3) = 20 label splits, 2 reach ratio 2 (the two 3s are interchangeable) and 2 the
    # mirror 1/2: two-sided p = 2 * 2 / 20.
    syn, nat = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0]
    r = metrics.complexity_ratio(_per_image({"synthetic": syn, "natural": nat}), n_resamples=999, seed=4)
    assert r["value"] == pytest.approx(2.0) and r["cohens_d"] == pytest.approx(2.0)
    assert r["p_value"] == pytest.approx(0.2)
    flipped = metrics.complexity_ratio(_per_image({"synthetic": nat, "natural": syn}), n_resamples=99)
    assert flipped["cohens_d"] == pytest.approx(-2.0) and flipped["value"] == pytest.approx(0.5)
    want = st.bootstrap((np.array(nat), np.array(syn)),
                        lambda a, b, axis: np.mean(a, axis=axis) / np.mean(b, axis=axis),
                        n_resamples=999, method="percentile", rng=np.random.default_rng(4)).confidence_interval
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((want.low, want.high), rel=1e-12)


def test_complexity_ratio_point_from_aggregates():
    agg = pd.DataFrame([_agg_row("trained", "synthetic", 1, "a", 0, "entropy", 10, 2.0, 1.0),
                        _agg_row("trained", "natural", 1, "a", 0, "entropy", 10, 2.2, 1.0),
                        _agg_row("random", "natural", 1, "a", 0, "entropy", 10, 9.0, 1.0)])
    assert metrics.complexity_ratio_point(agg) == pytest.approx(1.1)
    assert math.isnan(metrics.complexity_ratio_point(agg, model="random"))


def _ablations():
    rows = []
    rng = np.random.default_rng(0)
    for head, factor in ((0, 1.5), (1, 1.0), (2, None)):
        for i in range(8):
            clean = 1.0 + 0.1 * i
            ablated = clean * (factor if factor else rng.uniform(0.9, 1.3))
            for mode in ("zero", "mean"):
                rows.append({"dataset": "natural", "timestep": 5, "layer": "a", "head": head, "mode": mode,
                             "image": i, "loss_clean": clean, "loss_ablated": ablated})
    return pd.DataFrame(rows)


def test_degradation_percent_ci_and_corrections():
    d = metrics.degradation(_ablations(), n_resamples=499)
    zero = d[d["mode"] == "zero"].set_index("head")
    assert zero.loc[0, "percent"] == pytest.approx(50.0)
    assert zero.loc[0, "ci_low"] == pytest.approx(50.0) and zero.loc[0, "ci_high"] == pytest.approx(50.0)
    assert zero.loc[0, "p_value"] == pytest.approx(2 / 2 ** 8)  # 8 positive differences: 1 sign pattern per tail
    assert zero.loc[1, "percent"] == 0.0 and zero.loc[1, "p_value"] == 1.0
    raw = _ablations().query("head == 2 and mode == 'zero'")
    want = 100 * (raw["loss_ablated"].mean() - raw["loss_clean"].mean()) / raw["loss_clean"].mean()
    assert zero.loc[2, "percent"] == pytest.approx(want) and zero.loc[2, "ci_low"] < want < zero.loc[2, "ci_high"]
    # Family of three with p0 < p2 < p1 = 1: Holm multiplies by 3, 2, 1 in that order, BH by 3/1, 3/2, 3/3.
    p = zero["p_value"]
    np.testing.assert_allclose(zero["p_holm"], [3 * p[0], 1.0, 2 * p[2]])
    np.testing.assert_allclose(zero["p_bh"], [3 * p[0], 1.0, 1.5 * p[2]])
    np.testing.assert_allclose(zero["p_bh"], st.false_discovery_control(p.to_numpy(), method="bh"))
    r = metrics.degradation_range(d, top=2)
    assert r["mode"] == "zero" and r["min"] == 0.0 and r["max"] == pytest.approx(50.0)
    assert [row["head"] for row in r["top"]] == [0, 2]
    quick = metrics.degradation(_ablations(), n_resamples=0)
    np.testing.assert_allclose(quick["percent"], d["percent"])
    assert quick["ci_low"].isna().all() and metrics.degradation(_ablations().iloc[:0]).empty


def _signed_rank_ablations():
    """Five images per head with distinct |differences|, so Wilcoxon's p is the exact null: no negative
    rank -> 2/32, rank 1 negative -> 4/32, rank 3 negative -> 10/32 (rank sums <= 3: 1 + 1 + 1 + 2 subsets).
    Two families: (natural, t=5, zero) with heads 0..2 and (natural, t=5, mean) with head 0 alone."""
    diffs = {0: [0.1, 0.2, 0.3, 0.4, 0.5], 1: [-0.1, 0.2, 0.3, 0.4, 0.5], 2: [0.1, 0.2, -0.3, 0.4, 0.5]}
    rows = [("natural", 5, "a", head, "zero", i, 1.0 + i, 1.0 + i + d) for head, ds in diffs.items()
            for i, d in enumerate(ds)]
    rows += [("natural", 5, "a", 0, "mean", i, 1.0 + i, 1.0 + i + d) for i, d in enumerate(diffs[1])]
    return pd.DataFrame(rows, columns=["dataset", "timestep", "layer", "head", "mode", "image", "loss_clean",
                                       "loss_ablated"])


def test_degradation_holm_and_bh_within_each_family():
    d = metrics.degradation(_signed_rank_ablations(), n_resamples=0)
    zero = d[d["mode"] == "zero"].set_index("head")
    np.testing.assert_allclose(zero["p_value"], [0.0625, 0.125, 0.3125])
    # Holm: 0.0625 x 3, 0.125 x 2, 0.3125 x 1 (running max); BH: x 3/1, 3/2, 3/3 (running min from the top).
    np.testing.assert_allclose(zero["p_holm"], [0.1875, 0.25, 0.3125])
    np.testing.assert_allclose(zero["p_bh"], [0.1875, 0.1875, 0.3125])
    mean = d[d["mode"] == "mean"].iloc[0]
    assert mean["p_value"] == mean["p_holm"] == mean["p_bh"] == pytest.approx(0.125)  # a family of one


def test_degradation_interval_is_scipys_paired_percentile_bootstrap():
    # Twelve images of continuous losses, so the percentiles depend on the resamples drawn (with five,
    # the few distinct resample means make every seed give the same bounds).
    rng = np.random.default_rng(3)
    clean = rng.uniform(1.0, 2.0, (3, 12))
    rows = [("natural", 5, "a", head, "zero", i, clean[head, i], clean[head, i] * rng.uniform(1.0, 1.6))
            for head in range(3) for i in range(12)]
    table = pd.DataFrame(rows, columns=["dataset", "timestep", "layer", "head", "mode", "image", "loss_clean",
                                        "loss_ablated"])
    d = metrics.degradation(table, n_resamples=999, seed=10)
    groups = table.groupby(["dataset", "timestep", "layer", "head", "mode"], sort=True)
    for i, (key, g) in enumerate(groups):  # group i of the sorted keys draws with seed + i
        clean, abl = g["loss_clean"].to_numpy(), g["loss_ablated"].to_numpy()
        want = st.bootstrap((clean, abl), lambda c, a, axis: 100 * (a.mean(axis) - c.mean(axis)) / c.mean(axis),
                            paired=True, n_resamples=999, method="percentile",
                            rng=np.random.default_rng(10 + i)).confidence_interval
        row = d.set_index(["dataset", "timestep", "layer", "head", "mode"]).loc[key]
        assert row["percent"] == pytest.approx(100 * (abl.mean() - clean.mean()) / clean.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((want.low, want.high), rel=1e-12), key


def test_attribution_agreement_spearman():
    # -score is the first-order estimate of a zero ablation's effect: at t = 1 it ranks the heads as
    # their degradation does, at t = 2 in reverse
    deg = pd.DataFrame({"dataset": "natural", "timestep": [1] * 5 + [2] * 5, "layer": "a", "head": list(range(5)) * 2,
                        "mode": "zero", "percent": [10, 20, 30, 40, 50, 50, 40, 30, 20, 10]})
    att = deg[["dataset", "timestep", "layer", "head"]].assign(score=-np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5.0]))
    r = metrics.attribution_agreement(att, deg)
    per = r["per_group"].set_index("timestep")
    assert per.loc[1, "rho"] == pytest.approx(1.0) and per.loc[2, "rho"] == pytest.approx(-1.0)
    assert r["n"] == 10 and abs(r["rho"]) < 0.5 and r["agreement"] == "signed"
    with pytest.raises(ValueError, match="agreement must be one of"):
        metrics.attribution_agreement(att, deg, "absolute")


def test_attribution_agreement_signed_and_magnitude_differ_where_signs_do():
    # heads that lower the loss when removed (negative percent) with a large predicted effect: signs
    # agree (signed rho = 1) and so do magnitudes; a prediction of the wrong sign
    # breaks the signed agreement only
    deg = pd.DataFrame({"dataset": "natural", "timestep": 1, "layer": "a", "head": range(4), "mode": "zero",
                        "percent": [-40.0, -10.0, 5.0, 20.0]})
    att = deg[["dataset", "timestep", "layer", "head"]].assign(score=[4.0, 1.0, -0.5, -2.0])
    signed = metrics.attribution_agreement(att, deg, "signed")
    magnitude = metrics.attribution_agreement(att, deg, "magnitude")
    assert signed["rho"] == pytest.approx(1.0)
    want = st.spearmanr([4.0, 1.0, 0.5, 2.0], [40.0, 10.0, 5.0, 20.0]).statistic
    assert magnitude["rho"] == pytest.approx(want) and want == pytest.approx(1.0)
    flipped = att.assign(score=[-4.0, 1.0, -0.5, -2.0])
    assert metrics.attribution_agreement(flipped, deg, "signed")["rho"] < 0.5
    assert metrics.attribution_agreement(flipped, deg, "magnitude")["rho"] == pytest.approx(1.0)


def test_complete_layers_fills_n_keys_from_histograms():
    layers = pd.DataFrame({"layer": ["a", "b"], "kind": "self", "heads": 1, "head_dim": 8, "n_keys": [None, 16],
                           "grid_h": None, "grid_w": None})
    hist = pd.concat([_hist({("synthetic", 0): [1, 1]}, layer="a").assign(hi=lambda f: (f["bin"] + 1) * math.log(64) / 2),
                      _hist({("synthetic", 0): [1, 1]}, layer="c").assign(hi=lambda f: (f["bin"] + 1) * math.log(9) / 2)])
    out = metrics.complete_layers(layers, hist).set_index("layer")["n_keys"]
    assert out.to_dict() == {"a": 64.0, "b": 16.0, "c": 9.0}
    assert metrics.complete_layers(None, None) is None


def test_complexity_ratio_by_timestep_finds_an_effect_confined_to_one_timestep():
    # natural images 20% higher at t = 100 only: the pooled ratio dilutes it, the per-timestep rows
    # show where it is (and that t = 900 has none)
    rng = np.random.default_rng(5)
    rows = []
    for ds, n in (("synthetic", 30), ("natural", 30)):
        for i in range(n):
            base = rng.normal(2.0, 0.05)
            for t in (100, 900):
                value = base * (1.2 if ds == "natural" and t == 100 else 1.0)
                rows.append({"model": "trained", "dataset": ds, "timestep": t, "image": i, "layer": "a", "head": 0,
                             "stat": "entropy", "mean": value})
    r = metrics.complexity_ratio(pd.DataFrame(rows), n_resamples=999, seed=0, control=None)
    by = {row["timestep"]: row for row in r["by_timestep"]}
    assert sorted(by) == [100, 900]
    assert by[100]["value"] == pytest.approx(1.2, abs=0.02) and by[100]["ci_low"] > 1.1
    assert by[100]["p_value"] == by[100]["p_floor"] == pytest.approx(2 / 1000)
    assert by[100]["cohens_d_ci_low"] > 2
    assert by[900]["ci_low"] < 1 < by[900]["ci_high"] and by[900]["p_value"] > 0.05
    assert 1.05 < r["value"] < 1.15 and r["value"] < by[100]["value"]


def test_degradation_p_tests_the_mean_difference_the_percent_reports():
    # one image degrades a lot, five improve a little: the mean loss rises (percent > 0) while most
    # signed ranks are negative. The p must be the sign-flip test of the mean difference, enumerated
    # here over all 2^6 sign patterns, and the family size and delta loss must be reported.
    diffs = np.array([1.2, -0.1, -0.15, -0.2, -0.05, -0.12])
    rows = [("natural", 5, "a", 0, "zero", i, 1.0, 1.0 + d) for i, d in enumerate(diffs)]
    rows += [("natural", 5, "a", 1, "zero", i, 1.0, 1.0) for i in range(6)]
    table = pd.DataFrame(rows, columns=["dataset", "timestep", "layer", "head", "mode", "image", "loss_clean",
                                        "loss_ablated"])
    row = metrics.degradation(table, n_resamples=0).set_index("head").loc[0]
    observed = abs(diffs.mean())
    flips = np.array(list(itertools.product((1, -1), repeat=6)))
    want = np.mean(np.abs((flips * diffs).mean(axis=1)) >= observed - 1e-12)
    assert row["percent"] > 0 and row["delta_loss"] == pytest.approx(diffs.mean())
    assert row["p_value"] == pytest.approx(want)
    assert row["family_size"] == 2


def _image_hist(counts: dict, timestep=10, model="trained") -> pd.DataFrame:
    """counts: {(dataset, image, layer): per-bin counts}: the trace's image_histograms table (nonzero bins)."""
    rows = [{"model": model, "dataset": ds, "timestep": timestep, "image": image, "layer": layer, "bin": b, "count": c}
            for (ds, image, layer), cs in counts.items() for b, c in enumerate(cs) if c]
    return pd.DataFrame(rows)


def _js(p, q) -> float:
    return float(jensenshannon(p, q) ** 2)  # scipy's distance is the square root of JS (natural log)


def _draws(rng, n_per_dataset, layers=("a", "b"), shift=0.0):
    """Per-image histograms of 6 bins, 40 queries each; natural images' bins tilted by shift."""
    out = {}
    for ds in ("synthetic", "natural"):
        for i in range(n_per_dataset):
            for layer in layers:
                p = np.exp(np.linspace(0, 1, 6) * (shift if ds == "natural" else 0.0))
                out[(ds, i, layer)] = rng.multinomial(40, p / p.sum())
    return out


def test_divergence_null_observed_value_is_the_pooled_divergence_and_p_the_exact_one():
    rng = np.random.default_rng(1)
    counts = _draws(rng, 3, shift=1.0)
    table = _image_hist(counts)
    got = metrics.entropy_divergence_null(table, n_permutations=4000, seed=0).set_index("timestep").loc[10]

    def statistic(natural: set) -> float:  # mean over layers of JS between the two groups' pooled counts
        keys = sorted({(ds, i) for ds, i, _ in counts})
        return float(np.mean([_js(sum(counts[(*k, layer)] for k in keys if k not in natural),
                                  sum(counts[(*k, layer)] for k in keys if k in natural)) for layer in ("a", "b")]))

    observed = statistic({("natural", i) for i in range(3)})
    assert got["js"] == pytest.approx(observed, rel=1e-10)
    # every one of the C(6, 3) = 20 labellings: the exact permutation p and null mean
    keys = sorted({(ds, i) for ds, i, _ in counts})
    null = [statistic(set(pick)) for pick in itertools.combinations(keys, 3)]
    exact_p = np.mean([v >= observed - 1e-15 for v in null])
    assert got["p"] == pytest.approx(exact_p, abs=0.02) and got["null_mean"] == pytest.approx(np.mean(null), rel=0.02)
    assert (got["n_permutations"], got["n_synthetic"], got["n_natural"]) == (4000, 3, 3)


def test_divergence_null_without_a_difference_gives_uniform_p_and_js_near_its_null():
    ps, ratio = [], []
    for seed in range(60):
        table = _image_hist(_draws(np.random.default_rng(100 + seed), 8))
        row = metrics.entropy_divergence_null(table, n_permutations=199, seed=seed).iloc[0]
        ps.append(row["p"])
        ratio.append(row["js"] / row["null_mean"])
    assert st.kstest(ps, "uniform").pvalue > 0.01
    assert 0.8 < np.mean(ratio) < 1.2  # the plug-in JS of equal distributions is its null's, not 0
    assert min(ps) >= 1 / 200


def test_divergence_null_finds_a_planted_difference_and_keeps_each_timesteps_permutations():
    rng = np.random.default_rng(7)
    planted = _image_hist(_draws(rng, 8, shift=1.5), timestep=10)
    null = _image_hist(_draws(rng, 8), timestep=20)
    both = metrics.entropy_divergence_null(pd.concat([planted, null]), n_permutations=199, seed=3).set_index("timestep")
    assert both.loc[10, "p"] == 1 / 200 and both.loc[10, "js"] > both.loc[10, "null_q"]
    assert both.loc[20, "p"] > 0.05
    alone = metrics.entropy_divergence_null(null, n_permutations=199, seed=3).set_index("timestep")
    pd.testing.assert_series_equal(alone.loc[20], both.loc[20])  # dropping timestep 10 changes nothing at 20
    assert metrics.entropy_divergence_null(planted.assign(model="random")).empty  # another model's rows only
