"""Metrics on the driver's saved tables (DESIGN.md, "Metrics"): pure functions of DataFrames.

Definitions (entropy in nats throughout):

- Head entropy H(h, t, d): the mean per-query attention entropy of head h at timestep t over
  all queries of all images of dataset d (``aggregates``: stat "entropy", column ``mean``).
  Its spread ``entropy_sd`` is the population sd of the per-query values, sqrt(m2 / count).
  ``normalised`` = H / ln(n_keys) (1 = uniform attention over all keys, 0 = one key);
  ``effective_span`` = exp(H), the number of keys a uniform distribution of equal entropy covers.
- Jensen-Shannon divergence of two histograms P, Q (counts, normalised to probabilities):
  JS = 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2, in nats; 0 for equal histograms,
  ln 2 for disjoint ones; empty bins contribute 0 (0 ln 0 = 0).
- Entropy divergence at timestep t: JS between the synthetic and natural histograms of
  per-query entropy, per head; pooled per layer (the heads' histograms of one layer summed, per
  dataset -- layers have different bin ranges [0, ln n_keys], so histograms are only summed
  within a layer) and per timestep as the mean over layers of the pooled per-layer JS. Also
  the difference of means H(natural) - H(synthetic), per head and averaged over heads.
  Null: the same per-timestep statistic with the images' dataset labels permuted (per-image
  histograms, a layer's heads together); p one-sided, (1 + #{null >= observed}) / (n + 1).
- Complexity ratio: each image contributes the mean of its per-image entropy over all heads and
  timesteps; ratio = mean over natural images / mean over synthetic images (= mean over heads
  and timesteps of H(natural) over the same for synthetic when every image has every cell).
  Interval: bootstrap over images, both datasets resampled independently; p-value: permutation
  of dataset labels over images (two-sided, statistic: the ratio).
- Matched-stimulus controls (``matched_controls``): a control set C is traced like the natural (N)
  and synthetic (S) sets; per timestep and pooled, r_S = H(N) / H(S) (the complexity ratio) and
  r_C = H(N) / H(C), both means over images. A *matched* control is the synthetic set with one
  property taken from the natural set (framing, spectrum and moments): explained =
  (r_S - r_C) / (r_S - 1), the share of the ratio's distance from 1 that matching the property
  removes (1: all of it, 0: none, < 0: matching widens the gap, > 1: it overshoots). An *exposure*
  control is a natural set the model was trained on: relative = (r_C - 1) / (r_S - 1), how large
  the seen/unseen difference is beside the natural/synthetic one. A matched control's images are
  derived from synthetic images (its first n), and r_S is taken over those sources alone, so that
  the two ratios differ in the matched property only. Intervals: percentile bootstrap over
  images, the natural images drawn once per resample for both ratios; a matched control image
  and its source drawn together (one unit), an exposure control's images and the synthetic ones
  independently. Where r_S's own interval holds 1 neither share is defined (NaN).
- Degradation of an ablation: 100 x (mean L_ablated - mean L_clean) / mean L_clean over the
  images (paired: same images, noise and timestep). Interval: paired bootstrap over images of
  that percent; p-value: paired sign-flip permutation test of the mean difference
  L_ablated - L_clean over images (zero exactly when the percent is zero: the test of the
  reported estimand); Holm and Benjamini-Hochberg adjusted across heads within each
  (dataset, timestep, mode), the family, whose size each row carries.
- Attribution agreement: Spearman rho between the attribution's first-order estimate of a zero
  ablation's effect (-score: removing a head moves the loss by about -dL/dgate) and the measured
  degradation of the same heads ("signed"), and between their magnitudes ("magnitude"), per
  (dataset, timestep) and pooled.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from scipy import special as _special
from scipy import stats as _st

from . import significance

__all__ = [
    "complete_layers", "entropy_profile", "js_divergence", "entropy_divergence", "entropy_divergence_null",
    "complexity_ratio", "complexity_ratio_point", "matched_controls", "degradation", "degradation_range", "attribution_agreement",
]

HEAD = ["layer", "head"]


def _select(frame: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows whose columns equal the given values (columns missing from the frame are ignored)."""
    mask = np.ones(len(frame), dtype=bool)
    for col, value in equal.items():
        if value is not None and col in frame.columns:
            mask &= (frame[col] == value).to_numpy()
    return frame[mask]


# --------------------------------------------------------------------------- entropy profile

def complete_layers(layers: Optional[pd.DataFrame], histograms: Optional[pd.DataFrame] = None) -> Optional[pd.DataFrame]:
    """``layers`` with numeric n_keys, filled where missing from the entropy histograms: per-query
    entropy is binned over [0, ln n_keys], so n_keys = round(exp(top bin edge)). Layers only in
    the histograms are added (other columns NaN). None when neither table gives anything."""
    if layers is not None and len(layers):
        out = layers.drop_duplicates("layer").copy()
        out["n_keys"] = pd.to_numeric(out["n_keys"], errors="coerce") if "n_keys" in out.columns else np.nan
    else:
        out = pd.DataFrame({"layer": pd.Series(dtype=object), "n_keys": pd.Series(dtype=np.float64)})
    if histograms is not None and len(histograms) and {"layer", "hi"} <= set(histograms.columns):
        h = _select(histograms, stat="entropy")
        top = h.groupby("layer", sort=True)["hi"].max()
        from_hist = np.round(np.exp(top.astype(np.float64)))
        known = set(out["layer"])
        extra = [layer for layer in from_hist.index if layer not in known]
        if extra:
            out = pd.concat([out, pd.DataFrame({"layer": extra})], ignore_index=True)
        missing = out["n_keys"].isna()
        out.loc[missing, "n_keys"] = out.loc[missing, "layer"].map(from_hist).to_numpy(dtype=np.float64)
    return out.reset_index(drop=True) if len(out) else None


def entropy_profile(aggregates: pd.DataFrame, layers: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per (model, dataset, timestep, layer, head): count, entropy_mean, entropy_sd (sqrt(m2/count)),
    n_keys, normalised (entropy_mean / ln n_keys; NaN without ``layers`` or with n_keys < 2) and
    effective_span (exp entropy_mean). Rows sorted by the key columns."""
    keys = [c for c in ("model", "dataset", "timestep") if c in aggregates.columns] + HEAD
    agg = _select(aggregates, stat="entropy")
    out = agg[keys].copy()
    out["count"] = agg["count"].to_numpy()
    out["entropy_mean"] = agg["mean"].to_numpy(dtype=np.float64)
    count = agg["count"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["entropy_sd"] = np.sqrt(agg["m2"].to_numpy(dtype=np.float64) / count)
    if layers is not None and len(layers):
        n_keys = pd.to_numeric(layers.drop_duplicates("layer").set_index("layer")["n_keys"], errors="coerce")
        out["n_keys"] = out["layer"].map(n_keys).to_numpy(dtype=np.float64)
    else:
        out["n_keys"] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        log_keys = np.log(out["n_keys"].to_numpy(dtype=np.float64))
        out["normalised"] = np.where(log_keys > 0, out["entropy_mean"] / log_keys, np.nan)
    out["effective_span"] = np.exp(out["entropy_mean"])
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- divergence

def js_divergence(p_counts, q_counts) -> np.ndarray | float:
    """Jensen-Shannon divergence (nats) between histograms along the last axis.

    Counts are normalised to probabilities; empty bins are fine. Result in [0, ln 2]: 0 for
    identical histograms, ln 2 for disjoint ones; NaN where either histogram is all zero.
    Returns a float for 1-D inputs, an array of the leading shape otherwise.
    """
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"histograms need equal shapes, got {p.shape} and {q.shape}")
    sp, sq = p.sum(axis=-1, keepdims=True), q.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p, q = p / sp, q / sq
        m = 0.5 * (p + q)
        js = 0.5 * _special.rel_entr(p, m).sum(axis=-1) + 0.5 * _special.rel_entr(q, m).sum(axis=-1)
    js = np.where((sp[..., 0] > 0) & (sq[..., 0] > 0), np.clip(js, 0.0, math.log(2.0)), np.nan)
    return float(js) if js.ndim == 0 else js


def _js_long(frame: pd.DataFrame, keys: list, a: str, b: str) -> pd.DataFrame:
    """JS per group of ``keys`` from a long frame with one row per bin and count columns a, b."""
    f = frame[keys].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        p = frame[a] / frame.groupby(keys, sort=False)[a].transform("sum")
        q = frame[b] / frame.groupby(keys, sort=False)[b].transform("sum")
        m = 0.5 * (p + q)
        f["js"] = 0.5 * _special.rel_entr(p.to_numpy(), m.to_numpy()) + 0.5 * _special.rel_entr(q.to_numpy(), m.to_numpy())
    f["_pa"], f["_pb"] = frame[a].to_numpy(), frame[b].to_numpy()
    g = f.groupby(keys, sort=True).agg(js=("js", "sum"), _pa=("_pa", "sum"), _pb=("_pb", "sum")).reset_index()
    g["js"] = np.where((g["_pa"] > 0) & (g["_pb"] > 0), g["js"].clip(0.0, math.log(2.0)), np.nan)
    return g.drop(columns=["_pa", "_pb"])


def entropy_divergence(histograms: pd.DataFrame, aggregates: Optional[pd.DataFrame] = None, model: str = "trained",
                       datasets: tuple = ("synthetic", "natural"), stat: str = "entropy") -> dict:
    """Entropy divergence between two datasets for one model (definitions in the module docstring).

    Returns a dict of
    - ``per_head``: DataFrame (timestep, layer, head, js, mean_diff),
    - ``per_layer``: DataFrame (timestep, layer, js) -- heads' histograms summed within a layer,
    - ``per_timestep``: DataFrame (timestep, js, mean_diff) -- js = mean over layers of the
      per-layer pooled JS; mean_diff = mean over heads of H(natural) - H(synthetic),
    - ``min`` / ``max``: range of the per-timestep pooled JS (NaN when there is none).
    mean_diff needs ``aggregates`` (NaN otherwise). ``datasets`` = (reference, other).
    """
    ref, other = datasets
    h = _select(histograms, model=model, stat=stat)
    h = h[h["dataset"].isin(datasets)]
    wide = (h.pivot_table(index=["timestep", "layer", "head", "bin"], columns="dataset", values="count",
                          aggfunc="sum", fill_value=0)
            .reindex(columns=list(datasets), fill_value=0).reset_index())
    wide.columns.name = None
    per_head = _js_long(wide, ["timestep", "layer", "head"], ref, other)
    per_layer = _js_long(wide.groupby(["timestep", "layer", "bin"], sort=True)[[ref, other]].sum().reset_index(),
                         ["timestep", "layer"], ref, other)
    per_timestep = per_layer.groupby("timestep", sort=True)["js"].mean().reset_index()

    per_head["mean_diff"] = np.nan
    per_timestep["mean_diff"] = np.nan
    if aggregates is not None and len(aggregates):
        a = _select(aggregates, model=model, stat=stat)
        means = a.pivot_table(index=["timestep", "layer", "head"], columns="dataset", values="mean", aggfunc="mean")
        if ref in means.columns and other in means.columns:
            diff = (means[other] - means[ref]).rename("mean_diff").reset_index()
            per_head = per_head.drop(columns="mean_diff").merge(diff, on=["timestep", "layer", "head"], how="left")
            by_t = diff.groupby("timestep")["mean_diff"].mean()
            per_timestep["mean_diff"] = per_timestep["timestep"].map(by_t).to_numpy(dtype=np.float64)
    js = per_timestep["js"].to_numpy(dtype=np.float64)
    finite = js[np.isfinite(js)]
    return {
        "per_head": per_head.reset_index(drop=True),
        "per_layer": per_layer.reset_index(drop=True),
        "per_timestep": per_timestep.reset_index(drop=True),
        "min": float(finite.min()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
    }


def _layer_counts(frame: pd.DataFrame, images: list) -> np.ndarray:
    """(layers, images, bins) float64 counts of a long per-image histogram frame (image key
    columns dataset, image; layers in sorted order, bins up to the largest seen)."""
    layers = sorted(frame["layer"].unique())
    bins = int(frame["bin"].max()) + 1
    row_of = {key: i for i, key in enumerate(images)}
    counts = np.zeros((len(layers), len(images), bins))
    layer_index = frame["layer"].map({name: i for i, name in enumerate(layers)}).to_numpy()
    image_index = np.array([row_of[key] for key in zip(frame["dataset"], frame["image"])])
    np.add.at(counts, (layer_index, image_index, frame["bin"].to_numpy(dtype=np.int64)),
              frame["count"].to_numpy(dtype=np.float64))
    return counts


def entropy_divergence_null(image_histograms: pd.DataFrame, model: str = "trained",
                            datasets: tuple = ("synthetic", "natural"), n_permutations: int = 2000,
                            seed: int = 0, quantile: float = 0.95) -> pd.DataFrame:
    """The per-timestep entropy divergence against its image-label permutation null.

    image_histograms: the trace's per-image entropy histograms (columns model, dataset, timestep,
    image, layer, bin, count: a layer's heads together, nonzero bins). At each timestep the
    statistic is the divergence's per-timestep value (``entropy_divergence``: the mean over layers
    of the JS of the two datasets' pooled histograms); the null recomputes it with the images'
    dataset labels permuted (group sizes kept), n_permutations times, the same permutation for
    every layer of an image. Plug-in JS is biased upwards in finite samples, so the observed value
    means something only beside its null.

    Returns a DataFrame (timestep, js, null_mean, null_q (the ``quantile`` of the null), p,
    n_permutations, n_{datasets[0]}, n_{datasets[1]}): p = (1 + #{null >= js}) / (n + 1), one-sided
    (larger = more different), at least 1 / (n + 1). Each timestep's permutations come from
    (seed, timestep): they do not change when other timesteps are added or dropped.
    """
    ref, other = datasets
    h = _select(image_histograms, model=model)
    h = h[h["dataset"].isin(datasets)]
    rows = []
    for t, g in h.groupby("timestep", sort=True):
        images = sorted(set(zip(g["dataset"], g["image"])))
        is_other = np.array([ds == other for ds, _ in images])
        n_other, n_ref = int(is_other.sum()), int((~is_other).sum())
        if not n_other or not n_ref:
            continue
        counts = _layer_counts(g, images)                              # (L, N, bins)
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(t)]))
        labels = np.stack([is_other] + [rng.permutation(is_other) for _ in range(n_permutations)]).astype(np.float64)
        total = counts.sum(axis=1)                                     # (L, bins)
        other_sums = np.einsum("pn,lnb->lpb", labels, counts)          # (L, 1 + n, bins)
        js = js_divergence(total[:, None, :] - other_sums, other_sums)  # (L, 1 + n)
        with np.errstate(invalid="ignore"):
            stat = np.nanmean(js, axis=0)                              # mean over layers
        observed, null = stat[0], stat[1:]
        rows.append({"timestep": int(t), "js": float(observed), "null_mean": float(null.mean()),
                     "null_q": float(np.quantile(null, quantile)),
                     "p": float((1 + np.count_nonzero(null >= observed - 1e-15)) / (n_permutations + 1)),
                     "n_permutations": int(n_permutations), f"n_{ref}": n_ref, f"n_{other}": n_other})
    return pd.DataFrame(rows, columns=["timestep", "js", "null_mean", "null_q", "p", "n_permutations", f"n_{ref}",
                                       f"n_{other}"])


# --------------------------------------------------------------------------- complexity ratio

def _image_means(per_image: pd.DataFrame, model: str, stat: str, timestep=None) -> pd.DataFrame:
    p = _select(per_image, model=model, stat=stat)
    if timestep is not None:
        p = p[p["timestep"] == timestep]
    return p.groupby(["dataset", "image"], sort=True)["mean"].mean().reset_index()


def _ratio_test(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int, confidence: float) -> dict:
    """The ratio mean a / mean b over images with its bootstrap interval, permutation p (and the
    floor it cannot go below), Cohen's d with its bootstrap interval."""
    ci = significance.ratio_of_means_ci(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    test = significance.permutation_test(a, b, statistic="mean_ratio", n_resamples=n_resamples, seed=seed)
    d_lo, d_hi = significance.cohens_d_ci(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    floor, n_permutations = significance.permutation_floor(a.size, b.size, n_resamples) if a.size and b.size \
        else (None, None)
    return {"value": ci.value, "ci_low": ci.ci_low, "ci_high": ci.ci_high, "p_value": test.p_value,
            "p_floor": floor, "n_permutations": n_permutations, "cohens_d": significance.cohens_d(a, b),
            "cohens_d_ci_low": d_lo, "cohens_d_ci_high": d_hi}


def complexity_ratio(per_image: pd.DataFrame, model: str = "trained", n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95, datasets: tuple = ("synthetic", "natural"), stat: str = "entropy",
                     control: Optional[str] = "random") -> dict:
    """Complexity ratio H(natural) / H(synthetic) over images (definition in the module docstring).

    Returns {value, ci_low, ci_high, p_value, p_floor (the smallest p the permutation test can give:
    a p at the floor reads "p <= p_floor"), n_permutations, cohens_d ((mean numerator - mean
    denominator image entropy) / pooled sd: positive when natural images have the higher entropy),
    cohens_d_ci_low, cohens_d_ci_high, n_synthetic, n_natural, confidence, by_timestep,
    random_control}: by_timestep is the same test on each timestep's image means alone (a list of
    dicts with a timestep key, when per_image has one), random_control the same dict, without its
    own control, for the model named ``control`` when per_image has rows for it, else None.
    ``datasets`` is (denominator, numerator). Values are NaN when a dataset has no images.
    """
    den, num = datasets

    def image_means(timestep=None):
        images = _image_means(per_image, model, stat, timestep)
        return (images.loc[images["dataset"] == num, "mean"].to_numpy(dtype=np.float64),
                images.loc[images["dataset"] == den, "mean"].to_numpy(dtype=np.float64))

    a, b = image_means()
    out = {**_ratio_test(a, b, n_resamples, seed, confidence), f"n_{den}": int(b.size), f"n_{num}": int(a.size),
           "confidence": confidence, "by_timestep": []}
    if "timestep" in per_image.columns:
        for t in sorted(_select(per_image, model=model, stat=stat)["timestep"].unique()):
            a_t, b_t = image_means(t)
            out["by_timestep"].append({"timestep": int(t), **_ratio_test(a_t, b_t, n_resamples, seed, confidence)})
    if control is not None and control != model:
        has = "model" in per_image.columns and bool((per_image["model"] == control).any())
        out["random_control"] = (complexity_ratio(per_image, control, n_resamples, seed, confidence, datasets, stat,
                                                  control=None) if has else None)
    return out


def complexity_ratio_point(aggregates: pd.DataFrame, model: str = "trained",
                           datasets: tuple = ("synthetic", "natural"), stat: str = "entropy") -> float:
    """The complexity ratio from aggregates alone (no images, so no interval): mean over
    (timestep, layer, head) cells of H(natural) / the same mean for synthetic."""
    den, num = datasets
    a = _select(aggregates, model=model, stat=stat)
    h_num = a.loc[a["dataset"] == num, "mean"].astype(float)
    h_den = a.loc[a["dataset"] == den, "mean"].astype(float)
    if h_num.empty or h_den.empty or h_den.mean() == 0:
        return math.nan
    return float(h_num.mean() / h_den.mean())


# --------------------------------------------------------------------------- matched controls

MATCHED, EXPOSURE = "matched", "exposure"
CONTROL_KINDS = {"framing": MATCHED, "spectrum": MATCHED, "seen": EXPOSURE}  # the sets of ``analysis.controls``


def _share(kind: str, r_synthetic, r_control):
    """explained (matched) or relative (exposure) of the module docstring, elementwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.asarray(r_synthetic, np.float64) - 1.0
        if kind == MATCHED:
            return (np.asarray(r_synthetic, np.float64) - np.asarray(r_control, np.float64)) / gap
        return (np.asarray(r_control, np.float64) - 1.0) / gap


def control_share(natural, synthetic, control, kind: str = MATCHED, n_resamples: int = 2000,
                  confidence: float = 0.95, seed: int = 0, paired: bool = False) -> dict:
    """{value, ci_low, ci_high} of a control's share (``_share``: explained or relative) from the
    per-image means (1-D arrays) of the three sets, with the bootstrap of the module docstring:
    natural images resampled once per draw for both ratios; with ``paired`` the synthetic and
    control arrays are aligned pairs (a control image and its synthetic source), resampled
    together, else each on its own. NaN when a set is empty."""
    n, s, c = (np.asarray(x, np.float64) for x in (natural, synthetic, control))
    if paired:
        if s.shape != c.shape:
            raise ValueError(f"paired synthetic and control means need equal lengths, got {s.size} and {c.size}")
        ok = np.isfinite(s) & np.isfinite(c)
        s, c = s[ok], c[ok]
    else:
        s, c = s[np.isfinite(s)], c[np.isfinite(c)]
    n = n[np.isfinite(n)]
    if not (n.size and s.size and c.size):
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    value = float(_share(kind, n.mean() / s.mean(), n.mean() / c.mean()))
    rng = np.random.default_rng(seed)
    mn = n[rng.integers(0, n.size, (n_resamples, n.size))].mean(1)
    pick_s = rng.integers(0, s.size, (n_resamples, s.size))
    pick_c = pick_s if paired else rng.integers(0, c.size, (n_resamples, c.size))
    draws = _share(kind, mn / s[pick_s].mean(1), mn / c[pick_c].mean(1))
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - confidence) / 2
    lo, hi = (float(np.percentile(draws, q)) for q in (tail, 100 - tail)) if draws.size else (math.nan, math.nan)
    return {"value": value, "ci_low": lo, "ci_high": hi}


def matched_controls(per_image: pd.DataFrame, control_per_image: pd.DataFrame, kinds: dict, model: str = "trained",
                     n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95, stat: str = "entropy") -> dict:
    """Each control set beside the complexity ratio (definitions in the module docstring).

    per_image: the trace's per-image table (datasets "synthetic" and "natural"); control_per_image:
    the same columns with one dataset per control; kinds: {control name: MATCHED or EXPOSURE}. A
    matched control's images are derived from the synthetic images of the same ids: it is compared
    with those synthetic images alone, pair by pair (``control_share(paired=True)``); an exposure
    control with every synthetic image.
    Returns {control: {kind, pooled, by_timestep}}: pooled and each by_timestep row hold the
    natural/control ratio test (value, ci_low, ci_high, p_value, p_floor, cohens_d (natural minus
    control image means over their pooled sd) and its interval, as ``complexity_ratio``),
    synthetic_ratio (the natural/synthetic ratio on the synthetic images compared, value and
    interval), share {value, ci_low, ci_high} (explained or relative; NaN where the synthetic
    ratio's interval holds 1), n_control and n_synthetic."""
    both = pd.concat([_select(per_image, model=model, stat=stat), _select(control_per_image, model=model, stat=stat)],
                     ignore_index=True)
    steps = sorted(both["timestep"].unique()) if "timestep" in both.columns else []

    def means(name, timestep=None) -> pd.Series:
        images = _image_means(both, model, stat, timestep)
        return images.loc[images["dataset"] == name].set_index("image")["mean"].astype(np.float64).sort_index()

    def compare(name, kind, timestep=None):
        nat, syn, ctl = means("natural", timestep), means("synthetic", timestep), means(name, timestep)
        paired = kind == MATCHED
        if paired:  # each control image beside its own synthetic source
            ids = ctl.index.intersection(syn.index)
            syn, ctl = syn.loc[ids], ctl.loc[ids]
        nat, syn, ctl = nat.to_numpy(), syn.to_numpy(), ctl.to_numpy()
        row = _ratio_test(nat, ctl, n_resamples, seed, confidence)
        synth = significance.ratio_of_means_ci(nat, syn, n_resamples=n_resamples, confidence=confidence, seed=seed)
        row["synthetic_ratio"] = {"value": synth.value, "ci_low": synth.ci_low, "ci_high": synth.ci_high}
        share = control_share(nat, syn, ctl, kind, n_resamples, confidence, seed, paired=paired)
        if not (synth.ci_low > 1 or synth.ci_high < 1):  # no gap to explain, or one the interval cannot tell from 0
            share = {k: math.nan for k in share}
        row["share"] = share
        row["n_control"], row["n_synthetic"] = int(ctl.size), int(syn.size)
        return row

    out = {}
    for name, kind in kinds.items():
        if not (control_per_image["dataset"] == name).any():
            continue
        out[name] = {"kind": kind, "pooled": compare(name, kind),
                     "by_timestep": [{"timestep": int(t), **compare(name, kind, t)} for t in steps]}
    return out


# --------------------------------------------------------------------------- degradation

def _percent(clean, ablated, axis=-1):
    c = np.mean(clean, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (np.mean(ablated, axis=axis) - c) / c


PERMUTATIONS = 2000  # resamples of the ablation test when the bootstrap is skipped


def degradation(ablations: pd.DataFrame, n_resamples: int = 2000, confidence: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """Per (dataset, timestep, layer, head, mode): n_images, loss_clean, loss_ablated (means over
    images), delta_loss (their difference), percent, ci_low, ci_high (paired bootstrap over images of
    the percent), p_value (paired sign-flip permutation test of the mean difference, exact up to
    2^n_images <= n_resamples), p_holm and p_bh (adjusted across heads within each family
    (dataset, timestep, mode)), family_size. The bootstrap and the test of the i-th group (in sorted
    key order) use seed + i; n_resamples=0 skips the bootstrap (ci_low, ci_high NaN), e.g. for
    plots, and tests with PERMUTATIONS resamples.
    """
    keys = ["dataset", "timestep", "layer", "head", "mode"]
    cols = keys + ["n_images", "loss_clean", "loss_ablated", "delta_loss", "percent", "ci_low", "ci_high", "p_value",
                   "p_holm", "p_bh", "family_size"]
    if ablations is None or ablations.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for i, (key, g) in enumerate(ablations.groupby(keys, sort=True)):
        g = g.groupby("image", sort=True)[["loss_clean", "loss_ablated"]].mean()
        clean = g["loss_clean"].to_numpy(dtype=np.float64)
        abl = g["loss_ablated"].to_numpy(dtype=np.float64)
        if n_resamples > 0:
            ci = significance.paired_bootstrap_ci(clean, abl, _percent, n_resamples=n_resamples, confidence=confidence,
                                           seed=seed + i)
        else:
            ci = significance.Interval(float(_percent(clean, abl)), math.nan, math.nan, confidence)
        test = significance.permutation_test(abl, clean, statistic="mean_diff", paired=True,
                                             n_resamples=n_resamples or PERMUTATIONS, seed=seed + i)
        rows.append((*key, len(g), float(np.mean(clean)), float(np.mean(abl)), float(np.mean(abl) - np.mean(clean)),
                     ci.value, ci.ci_low, ci.ci_high, test.p_value))
    out = pd.DataFrame(rows, columns=cols[:-3])
    family = out.groupby(["dataset", "timestep", "mode"], sort=False)["p_value"]
    out["p_holm"] = family.transform(lambda p: significance.holm(p.to_numpy()))
    out["p_bh"] = family.transform(lambda p: significance.benjamini_hochberg(p.to_numpy()))
    out["family_size"] = family.transform("size").astype(int)
    return out


def degradation_range(table: pd.DataFrame, mode: Optional[str] = "zero", top: int = 10) -> dict:
    """Range and top heads of a ``degradation`` table for one ablation mode (all modes if None
    or if the mode is absent): {mode, min, max, top: list of row dicts sorted by percent desc}."""
    t = table
    if mode is not None and "mode" in t.columns and (t["mode"] == mode).any():
        t = t[t["mode"] == mode]
    else:
        mode = None
    pct = t["percent"].to_numpy(dtype=np.float64) if len(t) else np.array([])
    finite = pct[np.isfinite(pct)]
    best = t.assign(_p=pct).sort_values(["_p", "dataset", "timestep", "layer", "head"],
                                        ascending=[False, True, True, True, True], kind="stable", na_position="last")
    return {
        "mode": mode,
        "min": float(finite.min()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
        "top": best.drop(columns="_p").head(top).to_dict("records"),
    }


# --------------------------------------------------------------------------- attribution

def _spearman(x: np.ndarray, y: np.ndarray) -> tuple:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, int(x.size)
    r = _st.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue), int(x.size)


AGREEMENTS = ("signed", "magnitude")


def attribution_agreement(attribution: pd.DataFrame, degradation_table: pd.DataFrame, agreement: str = "signed",
                          mode: str = "zero", score: str = "score") -> dict:
    """Spearman rho between the attribution's estimate of each head's ablation effect and the
    measured degradation percent of the same heads (ablation ``mode``), per (dataset, timestep)
    and pooled over all. agreement "signed": -score against percent (the first-order estimate
    against the effect, signs kept); "magnitude": |score| against |percent|.

    ``degradation_table`` is a ``degradation`` output (or any frame with dataset, timestep,
    layer, head, percent and optionally mode); ``score``: the attribution column ("score", the
    first-order slope, or "score_ig", integrated gradients). Returns {rho, p_value, n, agreement,
    per_group: DataFrame (dataset, timestep, rho, p_value, n), pairs: the joined frame}.
    """
    if agreement not in AGREEMENTS:
        raise ValueError(f"agreement must be one of {AGREEMENTS}, got {agreement!r}")
    d = degradation_table
    if "mode" in d.columns:
        d = d[d["mode"] == mode]
    keys = ["dataset", "timestep", "layer", "head"]
    a = attribution.groupby(keys, sort=True)[score].mean().reset_index().rename(columns={score: "score"})
    pairs = a.merge(d[keys + ["percent"]], on=keys, how="inner")
    signed = agreement == "signed"
    pairs["x"] = -pairs["score"] if signed else pairs["score"].abs()
    pairs["y"] = pairs["percent"] if signed else pairs["percent"].abs()
    rho, p, n = _spearman(pairs["x"].to_numpy(dtype=np.float64), pairs["y"].to_numpy(dtype=np.float64))
    groups = [(ds, t, *_spearman(g["x"].to_numpy(dtype=np.float64), g["y"].to_numpy(dtype=np.float64)))
              for (ds, t), g in pairs.groupby(["dataset", "timestep"], sort=True)]
    per_group = pd.DataFrame(groups, columns=["dataset", "timestep", "rho", "p_value", "n"])
    return {"rho": rho, "p_value": p, "n": n, "agreement": agreement, "per_group": per_group, "pairs": pairs}
