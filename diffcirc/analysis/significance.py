"""Significance on saved results: tests, resampling intervals, effect sizes, multiplicity corrections.

Every function takes plain array-likes (lists, numpy arrays, pandas Series), drops non-finite
values (pairwise for paired tests), and is deterministic: resampling draws from
``numpy.random.default_rng(seed)``. Tests return ``TestResult(statistic, p_value)`` and intervals
``Interval(value, ci_low, ci_high, confidence)``; both have ``as_dict()``. Where a quantity is
undefined (too few samples, zero variance) the result holds NaN rather than raising.

Resampling is scipy's (``scipy.stats.permutation_test`` and ``scipy.stats.bootstrap``); the
bootstrap intervals are percentile intervals by default (``method="BCa"`` is available but is
undefined for degenerate samples such as a constant loss).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Union

import numpy as np
from scipy import stats as _st

__all__ = [
    "TestResult", "Interval", "mann_whitney", "permutation_test",
    "bootstrap_ci", "paired_bootstrap_ci", "ratio_of_means_ci", "cohens_d", "holm", "benjamini_hochberg",
]

NAN = float("nan")


@dataclass(frozen=True)
class TestResult:
    """A test statistic and its two-sided p-value."""

    __test__ = False  # not a pytest class

    statistic: float
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (confidence x 100)% resampling interval."""

    value: float
    ci_low: float
    ci_high: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def _finite_pairs(x, y) -> tuple:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def mann_whitney(a, b) -> TestResult:
    """Mann-Whitney U test of a vs b, two-sided; statistic is U of ``a``."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return TestResult(NAN, NAN)
    r = _st.mannwhitneyu(a, b, alternative="two-sided")
    return TestResult(float(r.statistic), float(r.pvalue))


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _median_diff(x, y, axis=-1):
    return np.median(x, axis=axis) - np.median(y, axis=axis)


def _mean_ratio(x, y, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)


def _paired_mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


_STATISTICS = {"mean_diff": _mean_diff, "median_diff": _median_diff, "mean_ratio": _mean_ratio}


def permutation_test(a, b, statistic: Union[str, Callable] = "mean_diff", paired: bool = False,
                     n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Two-sided permutation test of a vs b.

    statistic: "mean_diff" (mean a - mean b), "median_diff", "mean_ratio" (mean a / mean b), or
    a callable ``f(a, b[, axis])`` returning a float.
    paired=False permutes group labels over all values (independent samples); paired=True swaps
    within pairs, i.e. flips the sign of each difference (a and b of equal length). When the
    number of distinct permutations is at most n_resamples the test is exact. The p-value is
    scipy's two-sided one (twice the smaller tail, at most 1; never 0 for randomised tests).
    """
    if paired:
        a, b = _finite_pairs(a, b)
        if a.size == 0:
            return TestResult(NAN, NAN)
    else:
        a, b = _finite(a), _finite(b)
        if a.size == 0 or b.size == 0:
            return TestResult(NAN, NAN)
    if isinstance(statistic, str):
        if statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {sorted(_STATISTICS)} or a callable, got {statistic!r}")
        fn = _paired_mean_diff if (paired and statistic == "mean_diff") else _STATISTICS[statistic]
        vectorized = True
    else:
        fn, vectorized = statistic, None
    observed = float(fn(a, b, axis=-1) if vectorized else fn(a, b))
    if not np.isfinite(observed):
        return TestResult(observed, NAN)
    r = _st.permutation_test((a, b), fn, permutation_type="samples" if paired else "independent",
                             vectorized=vectorized, n_resamples=n_resamples, alternative="two-sided",
                             rng=np.random.default_rng(seed))
    return TestResult(float(r.statistic), float(min(1.0, r.pvalue)))


def _bootstrap(data: tuple, statistic: Callable, *, paired: bool, n_resamples: int, confidence: float,
               seed: int, method: str) -> Interval:
    value = float(statistic(*data))
    if not np.isfinite(value):
        return Interval(value, NAN, NAN, confidence)
    if all(np.ptp(d) == 0 for d in data):
        return Interval(value, value, value, confidence)  # degenerate: every resample is the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning and friends: NaN bounds say it
        r = _st.bootstrap(data, statistic, n_resamples=n_resamples, confidence_level=confidence,
                          method=method, paired=paired, rng=np.random.default_rng(seed))
    return Interval(value, float(r.confidence_interval.low), float(r.confidence_interval.high), confidence)


def bootstrap_ci(x, statistic: Callable = np.mean, n_resamples: int = 9999, confidence: float = 0.95,
                 seed: int = 0, method: str = "percentile") -> Interval:
    """Bootstrap interval of ``statistic(x)`` (resampling x with replacement).

    statistic is called as ``statistic(sample, axis=-1)`` when it takes ``axis`` (numpy
    reductions do), which is much faster; otherwise once per resample.
    """
    x = _finite(x)
    if x.size == 0:
        return Interval(NAN, NAN, NAN, confidence)
    return _bootstrap((x,), statistic, paired=False, n_resamples=n_resamples, confidence=confidence,
                      seed=seed, method=method)


def paired_bootstrap_ci(x, y, statistic: Callable = _paired_mean_diff, n_resamples: int = 9999,
                        confidence: float = 0.95, seed: int = 0, method: str = "percentile") -> Interval:
    """Bootstrap interval of ``statistic(x, y)`` resampling pairs (x_i, y_i) jointly.

    Default statistic: mean of x - y. ``statistic(x, y, axis=-1)`` is used when it takes axis.
    """
    x, y = _finite_pairs(x, y)
    if x.size == 0:
        return Interval(NAN, NAN, NAN, confidence)
    return _bootstrap((x, y), statistic, paired=True, n_resamples=n_resamples, confidence=confidence,
                      seed=seed, method=method)


def ratio_of_means_ci(a, b, n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0,
                      method: str = "percentile") -> Interval:
    """mean(a) / mean(b) with a bootstrap interval resampling a and b independently."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return Interval(NAN, NAN, NAN, confidence)
    return _bootstrap((a, b), _mean_ratio, paired=False, n_resamples=n_resamples, confidence=confidence,
                      seed=seed, method=method)


def permutation_floor(n_a: int, n_b: int, n_resamples: int) -> tuple:
    """(floor, n): the smallest two-sided p ``permutation_test(a, b)`` (independent samples) can
    return, and the number n of permutations it compares against: 2 / (n + 1) for a randomised
    test of n resamples (the observed arrangement counts as one), 2 / n for an exact test over all
    n = C(n_a + n_b, n_a) arrangements. A p at the floor reads only "p <= floor"."""
    arrangements = math.comb(n_a + n_b, n_a)
    if arrangements <= n_resamples:
        return min(1.0, 2.0 / arrangements), arrangements
    return min(1.0, 2.0 / (n_resamples + 1)), n_resamples


def cohens_d_ci(a, b, n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap interval (lo, hi) of ``cohens_d(a, b)``, each sample resampled on its
    own (images are the unit); (NaN, NaN) when d is undefined."""
    a, b = _finite(a), _finite(b)
    if a.size < 2 or b.size < 2:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, (n_resamples, a.size))]
    rb = b[rng.integers(0, b.size, (n_resamples, b.size))]
    pooled = np.sqrt(((a.size - 1) * ra.var(axis=1, ddof=1) + (b.size - 1) * rb.var(axis=1, ddof=1))
                     / (a.size + b.size - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (ra.mean(axis=1) - rb.mean(axis=1)) / pooled
    d = d[np.isfinite(d)]
    if d.size == 0:
        return NAN, NAN
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))


def cohens_d(a, b) -> float:
    """(mean a - mean b) / pooled sd, pooled sd = sqrt(((na-1) var_a + (nb-1) var_b) / (na+nb-2)).

    Zero pooled sd gives 0 when the means are equal and +-inf otherwise; fewer than 3 values
    in all gives NaN.
    """
    a, b = _finite(a), _finite(b)
    if a.size + b.size < 3 or a.size == 0 or b.size == 0:
        return NAN
    va = a.var(ddof=1) if a.size > 1 else 0.0
    vb = b.var(ddof=1) if b.size > 1 else 0.0
    sd = math.sqrt(((a.size - 1) * va + (b.size - 1) * vb) / (a.size + b.size - 2))
    diff = float(a.mean() - b.mean())
    if sd == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / sd


def _adjust(pvalues, step: str) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ps = p[order]
    rank = np.arange(1, m + 1)
    if step == "holm":
        adj = np.maximum.accumulate((m - rank + 1) * ps)
    else:
        adj = np.minimum.accumulate(((m / rank) * ps)[::-1])[::-1]
    out[order] = np.clip(adj, 0.0, 1.0)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order, monotone in the
    raw p-values, clipped to 1. NaN entries stay NaN and do not count towards the family size."""
    return _adjust(pvalues, "holm")


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (false discovery rate), in the input order,
    monotone in the raw p-values, clipped to 1. NaN entries stay NaN and are not counted."""
    return _adjust(pvalues, "bh")
