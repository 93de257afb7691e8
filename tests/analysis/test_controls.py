"""Matched-stimulus controls: a planted framing effect is explained by the framing control and an
effect of the faces themselves is not; Cohen's d and the shares' intervals against numpy and
scipy's bootstrap in float64; which controls a natural set allows; the sets the study builds."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as st

from diffcirc.analysis import controls, metrics
from diffcirc.analysis.config import AnalysisConfig
from diffcirc.data import LFW_TRAIN_COUNT, SyntheticFaces, lfw_split_indices
from diffcirc.data.controls import FaceBox, estimate_face_box, radial_amplitude, reframe, synthetic_face_box

SIZE, N = 32, 24
TARGET = FaceBox(x=0.45, y=0.55, width=0.30, height=0.36)  # the toy natural set's framing
STEPS = (100, 900)


def _faces(seed: int, framed: bool):
    """(images, labels) of N synthetic faces from ``seed``, reframed to TARGET when ``framed``."""
    items = [SyntheticFaces(n=N, size=SIZE, seed=seed)[i] for i in range(N)]
    images, labels = torch.stack([it["image"] for it in items]), torch.stack([it["labels"] for it in items])
    if framed:
        images, labels = reframe(images, labels, [synthetic_face_box(it["attributes"]) for it in items], TARGET)
    return images, labels


def _frame(dataset: str, values: dict) -> pd.DataFrame:
    """per_image rows of one dataset: values {timestep: (N,) entropy per image}."""
    return pd.DataFrame([{"model": "trained", "dataset": dataset, "timestep": t, "image": i, "layer": "a", "head": 0,
                          "stat": "entropy", "mean": float(v)} for t, vs in values.items() for i, v in enumerate(vs)])


@pytest.fixture(scope="module")
def toy_sets():
    """Face share (the fraction of non-background pixels: a property of the framing alone) of the
    toy natural set (faces framed to TARGET), the synthetic set (other faces, as generated) and its
    framing control (the synthetic faces framed to TARGET)."""
    share = lambda labels: (labels != 0).double().mean(dim=(1, 2)).numpy()  # noqa: E731
    return {"natural": share(_faces(50_000, True)[1]), "synthetic": share(_faces(60_000, False)[1]),
            "framing": share(_faces(60_000, True)[1])}


def _summary(entropy: dict, n_resamples=2000):
    per_image = pd.concat([_frame(name, entropy[name]) for name in ("synthetic", "natural")], ignore_index=True)
    return metrics.matched_controls(per_image, _frame("framing", entropy["framing"]), {"framing": metrics.MATCHED},
                                    n_resamples=n_resamples, seed=1)["framing"]


def test_a_planted_framing_effect_is_explained_by_the_framing_control(toy_sets):
    """Entropy a function of framing alone at t = 100, equal everywhere at t = 900."""
    entropy = {name: {100: 3.0 - 0.5 * share, 900: np.full(N, 4.0)} for name, share in toy_sets.items()}
    got = _summary(entropy)
    assert got["pooled"]["synthetic_ratio"]["ci_high"] < 1  # a gap to explain
    assert got["pooled"]["share"]["value"] == pytest.approx(1.0, abs=0.15)
    assert got["pooled"]["share"]["ci_low"] < 1 < got["pooled"]["share"]["ci_high"]
    early, late = got["by_timestep"]
    assert early["timestep"] == 100 and early["share"]["value"] == pytest.approx(1.0, abs=0.15)
    assert late["timestep"] == 900 and math.isnan(late["share"]["value"])  # no gap at t = 900: nothing to share


def test_an_effect_of_the_faces_themselves_is_not_explained_by_framing(toy_sets):
    """Natural images draw 0.2 nats less whatever their framing; framing adds a little."""
    entropy = {name: {100: 3.0 - 0.2 * (name == "natural") - 0.01 * share} for name, share in toy_sets.items()}
    got = _summary(entropy)["pooled"]
    assert got["synthetic_ratio"]["ci_high"] < 1
    assert 0 <= got["share"]["value"] < 0.1 and got["share"]["ci_high"] < 0.1  # the framing part's 0.01 alone
    assert got["ci_high"] < 1  # framed like the natural faces, the control is still as far from them


@pytest.mark.parametrize("kind", [metrics.MATCHED, metrics.EXPOSURE])
def test_cohens_d_and_the_intervals_against_float64_numpy_and_scipy(kind):
    """A matched control is paired with its synthetic sources (the same ids, resampled together),
    an exposure control stands beside every synthetic image (resampled apart)."""
    rng = np.random.default_rng(7)
    nat, syn, ctl = rng.normal(3.0, 0.1, 20), rng.normal(3.2, 0.1, 30), rng.normal(3.05, 0.12, 25)
    ctl[:] = syn[:25] - 0.15 + rng.normal(0, 0.03, 25)  # a control image follows its source
    per_image = pd.concat([_frame("synthetic", {100: syn}), _frame("natural", {100: nat})], ignore_index=True)
    got = metrics.matched_controls(per_image, _frame("c", {100: ctl}), {"c": kind}, n_resamples=4000,
                                   seed=1)["c"]["pooled"]
    compared = syn[:25] if kind == metrics.MATCHED else syn
    assert got["n_synthetic"] == compared.size and got["n_control"] == 25
    pooled = math.sqrt(((nat.size - 1) * nat.var(ddof=1) + (ctl.size - 1) * ctl.var(ddof=1)) / (nat.size + ctl.size - 2))
    assert got["cohens_d"] == pytest.approx((nat.mean() - ctl.mean()) / pooled, rel=1e-12)
    assert got["value"] == pytest.approx(nat.mean() / ctl.mean(), rel=1e-12)
    r_s, r_c = nat.mean() / compared.mean(), nat.mean() / ctl.mean()
    assert got["synthetic_ratio"]["value"] == pytest.approx(r_s, rel=1e-12)
    assert got["share"]["value"] == pytest.approx((r_s - r_c) / (r_s - 1) if kind == metrics.MATCHED
                                                  else (r_c - 1) / (r_s - 1), rel=1e-12)

    def cohens_d(a, b, axis=-1):
        va, vb = a.var(axis=axis, ddof=1), b.var(axis=axis, ddof=1)
        return (a.mean(axis) - b.mean(axis)) / np.sqrt(((a.shape[axis] - 1) * va + (b.shape[axis] - 1) * vb)
                                                        / (a.shape[axis] + b.shape[axis] - 2))

    def share(n, s_mean, c_mean):
        r_s, r_c = n / s_mean, n / c_mean
        return (r_s - r_c) / (r_s - 1) if kind == metrics.MATCHED else (r_c - 1) / (r_s - 1)

    if kind == metrics.MATCHED:  # resample natural images, and pair indices
        data = (nat, np.arange(25))
        share_of = lambda n, k, axis=-1: share(n.mean(axis), syn[k].mean(axis), ctl[k].mean(axis))  # noqa: E731
    else:
        data = (nat, syn, ctl)
        share_of = lambda n, s, c, axis=-1: share(n.mean(axis), s.mean(axis), c.mean(axis))  # noqa: E731
    for (lo, hi), sample, fn in [((got["cohens_d_ci_low"], got["cohens_d_ci_high"]), (nat, ctl), cohens_d),
                                 ((got["share"]["ci_low"], got["share"]["ci_high"]), data, share_of)]:
        ref = st.bootstrap(sample, fn, n_resamples=20000, method="percentile", rng=np.random.default_rng(0))
        width = ref.confidence_interval.high - ref.confidence_interval.low
        assert lo == pytest.approx(ref.confidence_interval.low, abs=0.1 * width)
        assert hi == pytest.approx(ref.confidence_interval.high, abs=0.1 * width)


@pytest.mark.parametrize("natural, allowed", [("lfw", ("framing", "spectrum", "seen")), ("photos", ("spectrum",)),
                                              ("folder:x", ("spectrum",)), ("celeba:x", ("framing", "spectrum", "seen"))])
def test_framing_and_seen_need_aligned_natural_faces_with_a_training_split(natural, allowed):
    assert controls.available(AnalysisConfig(natural=natural)) == allowed
    assert controls.available(AnalysisConfig(natural=natural, controls=("seen",))) == \
        tuple(c for c in allowed if c == "seen")
    assert controls.available(AnalysisConfig(natural=natural, controls=())) == ()


@pytest.mark.parametrize("n", [20, 100])
def test_seen_images_are_lfw_training_faces_unflipped(n):
    seen = controls.seen_dataset(AnalysisConfig(), SIZE, n)
    train = set(lfw_split_indices("train"))
    sources = [seen[i]["source"] for i in range(len(seen))]
    assert len(sources) == min(n, LFW_TRAIN_COUNT) and all(s.startswith("lfw:") and not s.endswith(":flip")
                                                           for s in sources)
    assert {int(s.split(":")[1]) for s in sources} <= train and len(train) == LFW_TRAIN_COUNT


def test_control_sets_take_the_natural_sets_framing_and_spectrum():
    natural, _ = _faces(50_000, True)
    items = [SyntheticFaces(n=8, size=SIZE, seed=60_000)[i] for i in range(8)]
    images, labels = torch.stack([it["image"] for it in items]), torch.stack([it["labels"] for it in items])
    framed, framed_labels, sources, table = controls.framing_set(images, labels, [it["attributes"] for it in items],
                                                                 [it["source"] for it in items], natural)
    assert framed.shape == images.shape and framed_labels.shape == labels.shape
    assert sources == [f"framing:{it['source']}" for it in items]
    rows = table.set_index("set")
    target = estimate_face_box(natural)
    assert rows.loc["natural", "size"] == pytest.approx(target.size)
    boxes = np.array([synthetic_face_box(it["attributes"]) for it in items])
    assert rows.loc["synthetic", ["x", "y", "width", "height"]].to_numpy(float) == pytest.approx(boxes.mean(0))
    spectrum = controls.spectrum_set(images, natural)
    want = radial_amplitude(natural).mean(0)
    got = radial_amplitude(spectrum).mean(0)
    # after the moments are matched the rings keep the natural shape (one scale per channel)
    ratio = (got[:, 1:] / want[:, 1:]).numpy()
    assert np.allclose(ratio, ratio[:, :1], rtol=1e-3)
    assert spectrum.mean(dim=(2, 3)).mean(0).numpy() == pytest.approx(natural.mean(dim=(2, 3)).mean(0).numpy(),
                                                                      abs=1e-5)
