"""Scaling exponents: least-squares fits of log(time) and log(peak memory) against log(N)."""

from __future__ import annotations

import math


def fit_exponent(ns, values) -> float | None:
    """Least-squares slope of log(value) against log(n): value ~ n^slope. Non-positive values are
    left out; None with fewer than two usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def scaling_fits(rows: list) -> list:
    """Per (implementation, dtype, b, h, d) of the timed op rows: the exponents of time and peak
    memory vs N, with the range of N and the number of points."""
    groups: dict = {}
    for r in rows:
        if r.get("ms") is None:
            continue
        groups.setdefault((r["implementation"], r["dtype"], r["b"], r["h"], r["d"]), []).append(r)
    fits = []
    for (impl, dt, b, h, d), rs in groups.items():
        rs.sort(key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        fits.append({"implementation": impl, "dtype": dt, "b": b, "h": h, "d": d, "n_min": ns[0], "n_max": ns[-1],
                     "points": len(ns), "time_exponent": fit_exponent(ns, [r["ms"] for r in rs]),
                     "memory_exponent": fit_exponent(ns, [r["peak_extra_bytes"] for r in rs])})
    return fits


def format_fits(fits: list) -> str:
    """The fits as a table, one line per fit; a missing exponent as '-'."""
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"{'implementation':16} {'dtype':5} {'D':>4} {'N range':>13} {'time ~ N^':>9} {'memory ~ N^':>11}"]
    for f in fits:
        lines.append(f"{f['implementation']:16} {f['dtype']:5} {f['d']:>4} {f['n_min']:>6}-{f['n_max']:<6} "
                     f"{fmt(f['time_exponent']):>9} {fmt(f['memory_exponent']):>11}")
    return "\n".join(lines)
