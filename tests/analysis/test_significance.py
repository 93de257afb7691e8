"""Statistics against scipy directly and against hand-computed values."""

import math

import numpy as np
import pytest
from scipy import stats as st

from diffcirc.analysis import significance


@pytest.fixture
def samples():
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, 30), rng.normal(0.8, 1.5, 25)


def test_mann_whitney_equals_scipy(samples):
    a, b = samples
    want = st.mannwhitneyu(a, b, alternative="two-sided")
    got = significance.mann_whitney(list(a) + [np.nan], b)  # NaN dropped
    assert (got.statistic, got.p_value) == pytest.approx((want.statistic, want.pvalue))


def test_mann_whitney_exact_small_case():
    # U of a = pairs with a > b = 0 + 0 + 2; of the C(7, 3) = 35 rank splits, U = 0, 1, 2 in 1, 1, 2
    # ways, so two-sided p = 2 * 4 / 35.
    got = significance.mann_whitney([1, 2, 5], [3, 4, 6, 7])
    assert got.statistic == 2.0 and got.p_value == pytest.approx(8 / 35)


@pytest.mark.parametrize("diffs, p", [
    ([0.1, 0.2, 0.3, 0.4, 0.5], 2 / 32),    # sum 1.5: only itself per tail, of 32 sign patterns
    ([-0.1, 0.2, 0.3, 0.4, 0.5], 4 / 32),   # sum 1.3: flipping {} or {0.1} reaches it
    ([0.1, 0.2, -0.3, 0.4, 0.5], 10 / 32),  # sum 0.9: flipped sets summing to <= 0.3: 5 of them
])
def test_paired_permutation_test_is_exact_over_sign_patterns(diffs, p):
    y = np.linspace(1.0, 2.0, 5)
    got = significance.permutation_test(y + np.array(diffs), y, statistic="mean_diff", paired=True, n_resamples=999)
    assert got.statistic == pytest.approx(np.mean(diffs)) and got.p_value == pytest.approx(p)


def test_permutation_test_identical_vs_shifted(samples):
    a, _ = samples
    assert significance.permutation_test(a, a.copy(), n_resamples=999).p_value > 0.5
    assert significance.permutation_test(a, a + 2.0, n_resamples=999).p_value < 0.01
    assert significance.permutation_test(a, a + 0.5, paired=True, n_resamples=999).p_value < 0.01
    assert significance.permutation_test(a, a + 2.0, n_resamples=99, seed=4) == significance.permutation_test(
        a, a + 2.0, n_resamples=99, seed=4)


def test_permutation_test_exact_small_samples():
    # 20 ways to split 6 values 3/3; the observed split is the most extreme of one tail.
    r = significance.permutation_test([1, 2, 3], [4, 5, 6])
    assert r.statistic == -3.0 and r.p_value == pytest.approx(2 / 20)
    # Paired: 16 sign patterns, all differences positive.
    r = significance.permutation_test([2, 4, 6, 8], [1, 2, 3, 4], paired=True)
    assert r.statistic == 2.5 and r.p_value == pytest.approx(2 / 16)
    r = significance.permutation_test([2, 4, 6], [1, 2, 3], statistic="mean_ratio")
    assert r.statistic == pytest.approx(2.0)
    with pytest.raises(ValueError, match="statistic"):
        significance.permutation_test([1, 2], [3, 4], statistic="nope")


def test_permutation_test_callable_statistic():
    r = significance.permutation_test([1, 2, 3], [4, 5, 6], statistic=lambda x, y: np.max(x) - np.max(y))
    assert r.statistic == -3.0 and 0 < r.p_value <= 1


def test_bootstrap_intervals(samples):
    a, b = samples
    ci = significance.bootstrap_ci(a, n_resamples=999, seed=1)
    assert ci.value == pytest.approx(a.mean()) and ci.ci_low < ci.value < ci.ci_high
    assert ci == significance.bootstrap_ci(a, n_resamples=999, seed=1) != significance.bootstrap_ci(a, n_resamples=999, seed=2)
    narrow = significance.bootstrap_ci(a, n_resamples=999, confidence=0.5, seed=1)
    assert ci.ci_low < narrow.ci_low < narrow.ci_high < ci.ci_high
    assert significance.bootstrap_ci([2.0, 2.0, 2.0]).as_dict() == {"value": 2.0, "ci_low": 2.0, "ci_high": 2.0,
                                                             "confidence": 0.95}
    med = significance.bootstrap_ci(a, statistic=lambda x: float(np.median(x)), n_resamples=99)
    assert med.value == pytest.approx(np.median(a))

    x, y = a[:20], a[:20] + 1.0 + 0.1 * b[:20]
    p = significance.paired_bootstrap_ci(x, y, n_resamples=999)
    assert p.value == pytest.approx(np.mean(x - y)) and p.ci_low < p.value < p.ci_high < 0
    r = significance.ratio_of_means_ci(a + 10, b + 10, n_resamples=999)
    assert r.value == pytest.approx((a + 10).mean() / (b + 10).mean()) and r.ci_low < r.value < r.ci_high


def test_bootstrap_intervals_equal_scipy_percentile_on_the_same_resamples(samples):
    a, b = samples
    rng = np.random.default_rng

    def ci(r):
        return (r.confidence_interval.low, r.confidence_interval.high)

    got = significance.bootstrap_ci(a, n_resamples=999, confidence=0.9, seed=5)
    want = st.bootstrap((a,), np.mean, n_resamples=999, confidence_level=0.9, method="percentile", rng=rng(5))
    assert (got.ci_low, got.ci_high) == pytest.approx(ci(want), rel=1e-12)

    x, y = a[:20], b[:20]
    got = significance.paired_bootstrap_ci(x, y, n_resamples=999, seed=6)
    want = st.bootstrap((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), paired=True, n_resamples=999,
                        method="percentile", rng=rng(6))
    assert (got.ci_low, got.ci_high) == pytest.approx(ci(want), rel=1e-12)

    got = significance.ratio_of_means_ci(a + 10, b + 10, n_resamples=999, seed=7)
    want = st.bootstrap((a + 10, b + 10), lambda u, v, axis: np.mean(u, axis=axis) / np.mean(v, axis=axis),
                        n_resamples=999, method="percentile", rng=rng(7))
    assert (got.ci_low, got.ci_high) == pytest.approx(ci(want), rel=1e-12)


def test_bootstrap_interval_known_case():
    # Five 0s and five 1s: a resample's mean is Binomial(10, 1/2) / 10, whose 2.5% and 97.5% quantiles
    # are 0.2 and 0.8 (P(X <= 1) = 11/1024 < 0.025 < P(X <= 2) = 56/1024, and symmetrically).
    ci = significance.bootstrap_ci([0.0] * 5 + [1.0] * 5, n_resamples=9999, seed=0)
    assert (ci.value, ci.ci_low, ci.ci_high) == pytest.approx((0.5, 0.2, 0.8))


def test_ratio_of_means_resamples_groups_independently():
    # Unequal group sizes only work with independent resampling.
    r = significance.ratio_of_means_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0, 10.0], n_resamples=199)
    assert r.value == pytest.approx(2.0 / 6.0) and r.ci_low <= r.value <= r.ci_high


def test_cohens_d_pooled_sd():
    # Means 4 and 2, both variances 1, pooled sd 1: d = (mean a - mean b) / 1, positive when a is larger.
    assert significance.cohens_d([3, 4, 5], [1, 2, 3]) == pytest.approx(2.0)
    assert significance.cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    # Variances 9 (n=3) and 0.5 (n=2): pooled sd = sqrt((2 * 9 + 1 * 0.5) / 3); means 5 and 1.5.
    assert significance.cohens_d([2, 5, 8], [1, 2]) == pytest.approx(3.5 / math.sqrt(18.5 / 3))
    a, b = [1.0, 2.0, 4.0, 7.0], [2.0, 2.5]
    pooled = math.sqrt((3 * np.var(a, ddof=1) + 1 * np.var(b, ddof=1)) / 4)
    assert significance.cohens_d(a, b) == pytest.approx((np.mean(a) - np.mean(b)) / pooled)
    assert significance.cohens_d([1, 1], [1, 1]) == 0.0 and significance.cohens_d([1, 1], [2, 2]) == -math.inf


def test_holm_known_values():
    # Sorted 0.001, 0.01, 0.02, 0.03, 0.2 times 5, 4, 3, 2, 1 = 0.005, 0.04, 0.06, 0.06, 0.2 (already monotone).
    np.testing.assert_allclose(significance.holm([0.02, 0.2, 0.001, 0.03, 0.01]), [0.06, 0.2, 0.005, 0.06, 0.04])
    np.testing.assert_allclose(significance.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(significance.holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(significance.holm([np.nan, 0.2, 0.6]), [np.nan, 0.4, 0.6])


def test_benjamini_hochberg_known_values():
    # Sorted 0.001, 0.01, 0.02, 0.03, 0.2 times 5/1, 5/2, 5/3, 5/4, 5/5 = 0.005, 0.025, 0.0333, 0.0375, 0.2,
    # then the running minimum from the top leaves them as they are.
    np.testing.assert_allclose(significance.benjamini_hochberg([0.02, 0.2, 0.001, 0.03, 0.01]),
                               [0.1 / 3, 0.2, 0.005, 0.0375, 0.025])
    np.testing.assert_allclose(significance.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(significance.benjamini_hochberg([0.5, 0.6]), [0.6, 0.6])
    np.testing.assert_allclose(significance.benjamini_hochberg([0.04, 0.01, 0.9, np.nan]), [0.06, 0.03, 0.9, np.nan])


@pytest.mark.parametrize("adjust", [significance.holm, significance.benjamini_hochberg])
def test_adjusted_pvalues_monotone_bounded(adjust):
    p = np.random.default_rng(3).uniform(0, 1, 50) ** 3
    q = adjust(p)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= -1e-15) and np.all(q >= p) and np.all(q <= 1.0)
    assert adjust([]).shape == (0,)


# ---- the permutation test's floor and Cohen's d's interval -------------------------------------

def test_permutation_floor_is_the_p_the_test_returns_when_nothing_is_as_extreme():
    # every natural image above every synthetic one: no permutation is as extreme as the observed
    # split, and scipy's randomised test returns exactly the floor
    rng = np.random.default_rng(0)
    a, b = rng.uniform(10, 11, 64), rng.uniform(0, 1, 20)
    floor, n = significance.permutation_floor(64, 20, 2000)
    assert (floor, n) == (2 / 2001, 2000)
    assert significance.permutation_test(a, b, statistic="mean_ratio", n_resamples=2000).p_value == floor
    # an exact test over C(6, 3) = 20 splits: the observed one and its mirror, 2 / 20
    assert significance.permutation_floor(3, 3, 199) == (0.1, 20)
    assert significance.permutation_test([4.0, 5, 6], [1.0, 2, 3], statistic="mean_diff", n_resamples=199).p_value \
        == pytest.approx(0.1)


def test_cohens_d_interval_matches_the_large_sample_normal_interval():
    # d = 1 between two normal samples of 2000: var(d) ~ (na + nb) / (na nb) + d^2 / (2 (na + nb))
    # (Hedges & Olkin), so the 95% interval is about d +- 1.96 * 0.0335
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    d = significance.cohens_d(a, b)
    lo, hi = significance.cohens_d_ci(a, b, n_resamples=2000, seed=3)
    half = 1.96 * math.sqrt(4000 / 2000**2 + d**2 / 8000)
    assert lo == pytest.approx(d - half, abs=0.015) and hi == pytest.approx(d + half, abs=0.015)
    assert significance.cohens_d_ci(a, b, n_resamples=2000, seed=3) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in significance.cohens_d_ci([1.0], [2.0, 3.0]))
