"""diffcirc.bench.scaling: fitted exponents of time and memory vs N."""

import math

import pytest

from diffcirc.bench import scaling


def test_scaling_fit_recovers_known_exponents():
    ns = [256, 512, 1024, 2048, 4096]
    assert scaling.fit_exponent(ns, [3e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert scaling.fit_exponent(ns, [7.0 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert scaling.fit_exponent([1], [1.0]) is None
    rows = [{"implementation": "x", "dtype": "f32", "b": 1, "h": 1, "d": 8, "n": n, "ms": 1e-4 * n**2 * (1.01 if i % 2 else 0.99),
             "peak_extra_bytes": 40 * n} for i, n in enumerate(ns)]
    (fit,) = scaling.scaling_fits(rows)
    assert math.isclose(fit["time_exponent"], 2.0, abs_tol=0.02)
    assert fit["memory_exponent"] == pytest.approx(1.0)
    assert "2.00" in scaling.format_fits([fit])


def test_fit_leaves_out_unusable_points():
    # the zero and the None are left out: the fit runs on (2, 4) and (8, 64), slope log(16)/log(4) = 2
    assert scaling.fit_exponent([1, 2, 4, 8], [0.0, 4.0, None, 64.0]) == pytest.approx(2.0)
    assert scaling.fit_exponent([4, 4], [1.0, 2.0]) is None  # one N only: no slope


def test_fits_per_group_and_skipped_rows_left_out():
    rows = [{"implementation": impl, "dtype": "f32", "b": 1, "h": 2, "d": 64, "n": n, "ms": float(n**k),
             "peak_extra_bytes": n} for impl, k in (("a", 1), ("b", 2)) for n in (4, 16, 64)]
    rows.append({"implementation": "a", "dtype": "f32", "b": 1, "h": 2, "d": 64, "n": 256, "skipped": "budget"})
    fits = {f["implementation"]: f for f in scaling.scaling_fits(rows)}
    assert fits["a"]["time_exponent"] == pytest.approx(1.0) and fits["b"]["time_exponent"] == pytest.approx(2.0)
    assert (fits["a"]["n_min"], fits["a"]["n_max"], fits["a"]["points"]) == (4, 64, 3)
    table = scaling.format_fits(list(fits.values())).splitlines()
    assert len(table) == 3 and table[2].split()[-2:] == ["2.00", "1.00"]
