"""Number formatting shared by the report writers and the terminal printer."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["DASH", "fmt", "fmt_ci", "fmt_p", "fmt_p_eq", "fmt_p_of", "fmt_range", "role_row", "mean_sd"]

DASH = "\u2014"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(x, digits: int = 3) -> str:
    """A number with ``digits`` decimals; a dash for None/NaN."""
    if _missing(x):
        return DASH
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}"


def fmt_ci(d: Optional[dict], digits: int = 3, unit: str = "") -> str:
    """"value [ci_low, ci_high]" from a dict with those keys."""
    if not d or _missing(d.get("value")):
        return DASH
    s = f"{fmt(d['value'], digits)}{unit}"
    if not _missing(d.get("ci_low")) and not _missing(d.get("ci_high")):
        s += f" [{fmt(d['ci_low'], digits)}, {fmt(d['ci_high'], digits)}]"
    return s


def fmt_p(p) -> str:
    """A p-value for a table cell: four decimals, "< 0.0001" below that, a dash when missing."""
    if _missing(p):
        return DASH
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_p_eq(p, floor=None, n_permutations=None) -> str:
    """A p-value for prose: "p = 0.0123", "p < 0.0001" or "p = \u2014"; at a permutation test's
    floor (the smallest p it can return), "p \u2264 0.001, the floor of 2000 permutations"."""
    if not _missing(p) and not _missing(floor) and p <= floor * (1 + 1e-9):
        of = f" of {n_permutations} permutations" if n_permutations else " of the permutation test"
        return f"p \u2264 {floor:.2g}, the floor{of}"
    text = fmt_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def fmt_p_of(d: Optional[dict]) -> str:
    """fmt_p_eq of a test's dict {p_value, p_floor, n_permutations} (any of them may be missing)."""
    d = d or {}
    return fmt_p_eq(d.get("p_value"), d.get("p_floor"), d.get("n_permutations"))


def fmt_range(lo, hi, digits: int = 3, unit: str = "") -> str:
    """"lo \u2013 hi" with a unit after each, a dash when either is missing."""
    if _missing(lo) or _missing(hi):
        return DASH
    return f"{fmt(lo, digits)}{unit} \u2013 {fmt(hi, digits)}{unit}"


def role_row(rows: Optional[list], role: str) -> Optional[dict]:
    """The row of ``role`` in a role-summary list, or None."""
    for r in rows or []:
        if r.get("role") == role:
            return r
    return None


def mean_sd(r: Optional[dict], digits: int = 3) -> str:
    """"mean \u00b1 sd (n=heads)" of a role-summary row, a dash for no heads."""
    if not r or not r.get("n_heads"):
        return DASH
    s = fmt(r.get("entropy_mean"), digits)
    if not _missing(r.get("entropy_sd")):
        s += f" \u00b1 {fmt(r['entropy_sd'], digits)}"
    return f"{s} (n={r['n_heads']})"
