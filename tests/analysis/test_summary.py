"""summarise() on small synthetic tables in the driver's exact schemas (the report's tests are in tests/report)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from diffcirc.analysis.circuit import greedy_minimal_circuit
from diffcirc.analysis.summary import summarise

LAYERS = pd.DataFrame({
    "layer": ["down_blocks.1.attentions.0", "mid_block.attentions.0"],
    "kind": ["self", "self"],
    "heads": [2, 2],
    "head_dim": [8, 8],
    "n_keys": [64, 16],
    "grid_h": [8, 4],
    "grid_w": [8, 4],
})
TIMESTEPS = [100, 500, 900]
DATASETS = ["synthetic", "natural"]
N_IMAGES = 6
BINS = 8


def _heads():
    return [(r.layer, h, r.n_keys) for r in LAYERS.itertuples() for h in range(r.heads)]


def make_run(out, with_optional=True, seed=0):
    """Write a small run: the trained model's natural entropy is 8% above synthetic; the random
    model sits near ln n_keys for both datasets."""
    rng = np.random.default_rng(seed)
    per_image, agg, hist = [], [], []
    n_q = {r.layer: r.grid_h * r.grid_w for r in LAYERS.itertuples()}
    for model in ("trained", "random"):
        for ds in DATASETS:
            for t in TIMESTEPS:
                for layer, h, nk in _heads():
                    top = math.log(nk)
                    if model == "trained":
                        base = top * (0.5 + 0.1 * h) * (1.08 if ds == "natural" else 1.0) * (1 + t / 9000)
                    else:
                        base = top * 0.98
                    img = base + rng.normal(0, 0.02, N_IMAGES)
                    for i, v in enumerate(img):
                        per_image.append((model, ds, t, i, layer, h, "entropy", v))
                    count = N_IMAGES * n_q[layer]
                    sd = 0.05 * top
                    agg.append((model, ds, t, layer, h, "entropy", count, img.mean(), sd, sd ** 2 * (count - 1)))
                    agg.append((model, ds, t, layer, h, "distance", count, 0.35 if h == 0 else 0.05, 0.01, 0.01))
                    agg.append((model, ds, t, layer, h, "label_mass", count, 0.6 if h == 1 else 0.2, 0.01, 0.01))
                    agg.append((model, ds, t, layer, h, "label_mass_uniform", count, 0.2, 0.0, 0.0))
                    values = np.clip(rng.normal(img.mean(), sd, count), 0, top)
                    counts, edges = np.histogram(values, bins=BINS, range=(0, top))
                    for b in range(BINS):
                        hist.append((model, ds, t, layer, h, "entropy", b, edges[b], edges[b + 1], int(counts[b])))
    cols = ["model", "dataset", "timestep", "layer", "head", "stat"]
    pd.DataFrame(per_image, columns=cols[:3] + ["image", "layer", "head", "stat", "mean"]).to_parquet(
        out / "per_image.parquet")
    pd.DataFrame(agg, columns=cols + ["count", "mean", "std", "m2"]).to_parquet(out / "aggregates.parquet")
    pd.DataFrame(hist, columns=cols + ["bin", "lo", "hi", "count"]).to_parquet(out / "histograms.parquet")
    LAYERS.to_parquet(out / "layers.parquet")
    data = {"synthetic": {"spec": "synthetic-gray", "n": N_IMAGES}, "natural": {"spec": "lfw", "n": N_IMAGES}}
    (out / "meta.json").write_text(json.dumps({"model": "tiny-ddpm", "data": data, "seed": seed,
                                               "timesteps": TIMESTEPS, "wall_time_s": 12.5}))
    if not with_optional:
        return
    fm = [(m, ds, t, layer, h, 0.5 if (m, layer, h) == ("trained", LAYERS.layer[0], 0) else 0.0,
           0.5 if (m, layer, h) == ("trained", LAYERS.layer[1], 1) else 0.0)
          for m in ("trained", "random") for ds in DATASETS for t in TIMESTEPS for layer, h, _ in _heads()]
    pd.DataFrame(fm, columns=cols[:-1] + ["edge_corr", "texture_corr"]).to_parquet(out / "features_maps.parquet")
    effect = {(layer, h): 30.0 * (1 + k) for k, (layer, h, _) in enumerate(_heads())}
    abl, att = [], []
    for ds in DATASETS:
        for t in TIMESTEPS:
            for (layer, h), e in effect.items():
                clean = rng.uniform(0.05, 0.1, N_IMAGES)
                for mode, scale in (("zero", 1.0), ("mean", 0.5)):
                    ablated = clean * (1 + scale * e / 100 * rng.uniform(0.8, 1.2, N_IMAGES))
                    abl += [(ds, t, layer, h, mode, i, clean[i], ablated[i]) for i in range(N_IMAGES)]
                att.append((ds, t, layer, h, -0.01 * e + rng.normal(0, 1e-4)))
    pd.DataFrame(abl, columns=["dataset", "timestep", "layer", "head", "mode", "image", "loss_clean",
                               "loss_ablated"]).to_parquet(out / "ablations.parquet")
    pd.DataFrame(att, columns=["dataset", "timestep", "layer", "head", "score"]).to_parquet(out / "attribution.parquet")
    ra = []
    for ds in DATASETS:
        for role, err in (("edge_detection", "edge"), ("texture_analysis", "high_freq")):
            for i in range(N_IMAGES):
                clean = 1.0 + 0.1 * i
                ra.append((ds, 500, role, "role", 0, i, err, clean, clean * 1.5))
                ra += [(ds, 500, role, "random", rep, i, err, clean, clean * 1.1) for rep in range(3)]
    pd.DataFrame(ra, columns=["dataset", "timestep", "role", "control", "rep", "image", "error_name", "err_clean",
                              "err_ablated"]).to_parquet(out / "role_ablations.parquet")
    traces = []
    for ds, keep_from in (("synthetic", 3), ("natural", 2)):
        heads = [(layer, h) for layer, h, _ in _heads()]
        cost = {hd: (0.0 if k < keep_from else 100.0) for k, hd in enumerate(heads)}
        _, trace = greedy_minimal_circuit(heads, lambda removed: sum(cost[x] for x in removed), 50.0)
        traces.append(trace.assign(dataset=ds))
    pd.concat(traces).to_parquet(out / "circuit.parquet")
    q = np.arange(16)
    maps = pd.DataFrame([("trained", ds, 500, 0, LAYERS.layer[1], h, int(k), float(k) / 16) for ds in DATASETS
                         for h in range(2) for k in q],
                        columns=["model", "dataset", "timestep", "image", "layer", "head", "query", "entropy"])
    maps.to_parquet(out / "maps.parquet")
    (out / "samples").mkdir()
    from matplotlib.image import imsave
    for ds in DATASETS:
        imsave(out / "samples" / f"{ds}_0.png", rng.uniform(0, 1, (16, 16, 3)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    make_run(out)
    return out


@pytest.fixture(scope="module")
def summary(run_dir):
    return summarise(run_dir, n_resamples=199, seed=3)


def _no_nan(obj):
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_no_nan(v) for v in obj)
    return not (isinstance(obj, float) and not math.isfinite(obj))


def test_summary_keys_values_and_json(run_dir, summary):
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary and _no_nan(summary)
    cr = summary["complexity_ratio"]
    assert cr["value"] == pytest.approx(1.08, abs=0.01) and cr["ci_low"] < cr["value"] < cr["ci_high"]
    assert cr["p_value"] < 0.05
    assert summary["random_control"]["complexity_ratio"]["value"] == pytest.approx(1.0, abs=0.01)
    div = summary["entropy_divergence"]
    assert set(div["per_timestep"]) == {str(t) for t in TIMESTEPS} and 0 < div["min"] <= div["max"] <= math.log(2)
    deg = summary["degradation"]
    assert deg["mode"] == "zero" and deg["min"] == pytest.approx(30, rel=0.2) and deg["max"] == pytest.approx(120, rel=0.2)
    assert deg["top"][0]["percent"] == deg["max"] and {"layer", "head", "timestep", "ci_low", "ci_high",
                                                       "p_value"} <= set(deg["top"][0])
    circuit = summary["circuit"]
    assert {k: circuit[k] for k in ("synthetic_size", "natural_size", "ratio", "n_heads", "final_degradation")} == {
        "synthetic_size": 1, "natural_size": 2, "ratio": 2.0, "n_heads": {"natural": 4, "synthetic": 4},
        "final_degradation": {"natural": 0.0, "synthetic": 0.0}}
    # synthetic keeps head 3, natural heads 2 and 3: one shared of two; no held-out table in this run
    assert circuit["overlap"]["jaccard"] == 0.5 and circuit["evaluation"] is None and circuit["resamples"] is None
    assert summary["attribution_spearman"]["rho"] > 0.9
    roles = {(r["layer"], r["head"]): r["role"] for r in summary["roles"]}
    assert roles[(LAYERS.layer[0], 0)] == "edge_detection" and roles[(LAYERS.layer[1], 1)] == "semantic_grouping"
    assert {"layer", "head", "role", "entropy_mean", "entropy_sd"} <= set(summary["roles"][0])
    assert summary["random_control"]["roles"] and summary["meta"]["wall_time_s"] == 12.5
    val = {(r["dataset"], r["role"]): r for r in summary["role_validation"]}
    edge = val[("natural", "edge_detection")]
    # the role raises the error 50%, each of the 3 random sets 10%: above all three, p at its floor 1/4
    assert edge["role_degradation"] == pytest.approx(50.0) and edge["random_median"] == pytest.approx(10.0)
    assert edge["p_rank"] == pytest.approx(0.25) == edge["p_floor"] and edge["direction"] == "role > random"
    checks = {r["role"]: r for r in summary["role_summary"]}
    # the random model's head 0 of each layer attends as far as uniform attention: global layout fires on 2 of 4
    assert checks["global_layout"]["random_share"] == 0.5 and checks["global_layout"]["status"] == "uninformative"
    # the random model groups labels as its head 1 does: uninformative too; edge maps with no image count: under-powered
    assert checks["semantic_grouping"]["status"] == "uninformative"
    assert checks["edge_detection"]["status"] == "under-powered" and checks["edge_detection"]["random_share"] == 0


def test_summary_cohens_d_is_natural_minus_synthetic_over_the_pooled_sd(run_dir, summary):
    per_image = pd.read_parquet(run_dir / "per_image.parquet").query("model == 'trained'")
    means = per_image.groupby(["dataset", "image"])["mean"].mean()
    nat, syn = means["natural"].to_numpy(), means["synthetic"].to_numpy()
    pooled = math.sqrt(((nat.size - 1) * nat.var(ddof=1) + (syn.size - 1) * syn.var(ddof=1))
                       / (nat.size + syn.size - 2))
    assert summary["complexity_ratio"]["cohens_d"] == pytest.approx((nat.mean() - syn.mean()) / pooled)
    assert summary["complexity_ratio"]["cohens_d"] > 0  # natural entropy is 8% higher in make_run


def test_summary_complexity_ratio_on_a_hand_computed_case(tmp_path):
    # Image means natural 3, 4, 5 and synthetic 1, 2, 3: ratio 2, Cohen's d (4 - 2) / 1 (both variances
    # 1), exact permutation p over the 20 label splits 2 * 2 / 20. The random model's images are equal.
    rows = [(model, ds, 10, i, "a", 0, "entropy", v) for model, nat in (("trained", [3.0, 4.0, 5.0]),
                                                                        ("random", [1.0, 2.0, 3.0]))
            for ds, values in (("synthetic", [1.0, 2.0, 3.0]), ("natural", nat)) for i, v in enumerate(values)]
    pd.DataFrame(rows, columns=["model", "dataset", "timestep", "image", "layer", "head", "stat", "mean"]).to_parquet(
        tmp_path / "per_image.parquet")
    s = summarise(tmp_path, n_resamples=199)
    cr = s["complexity_ratio"]
    assert (cr["value"], cr["cohens_d"], cr["p_value"]) == pytest.approx((2.0, 2.0, 0.2))
    assert cr["n_natural"] == cr["n_synthetic"] == 3 and cr["source"] == "per_image"
    control = s["random_control"]["complexity_ratio"]
    assert (control["value"], control["cohens_d"]) == pytest.approx((1.0, 0.0))


def test_summary_is_deterministic(run_dir, summary):
    assert summarise(run_dir, n_resamples=199, seed=3, write=False) == summary


def test_missing_optional_tables_give_null(tmp_path):
    make_run(tmp_path, with_optional=False)
    s = summarise(tmp_path, n_resamples=99)
    for key in ("degradation", "circuit", "attribution_spearman", "role_validation"):
        assert s[key] is None
    assert s["complexity_ratio"]["value"] is not None and s["roles"]


def test_empty_folder_does_not_crash(tmp_path):
    s = summarise(tmp_path, n_resamples=99)
    assert s["complexity_ratio"] is None and s["meta"] is None and s["random_control"] is None
