"""The matched-stimulus controls' tables (summary key ``controls``), shared by the document and the
terminal so both say the same thing."""

from __future__ import annotations

from typing import Optional

from .formatting import DASH, fmt, fmt_ci, fmt_p_of

DESCRIPTIONS = {
    "framing": "synthetic faces cropped to the natural set's face box",
    "spectrum": "synthetic faces with the natural radial amplitude spectrum and channel moments",
    "seen": "natural images the model was trained on",
}
SHARE_NAMES = {"matched": "explained", "exposure": "relative"}
DEFINITION = ("r_S = H(natural) / H(synthetic), r_C = H(natural) / H(control), means over images. A matched "
              "control (framing, spectrum) is the synthetic set with one property of the natural set, image by "
              "image, and r_S is taken over its synthetic sources alone: explained = (r_S \u2212 r_C) / "
              "(r_S \u2212 1), the share of the ratio's distance from 1 that matching the property removes (1: all "
              "of it, 0: none). The seen control is natural images the model was trained on: relative = "
              "(r_C \u2212 1) / (r_S \u2212 1), the seen/unseen difference beside the natural/synthetic one. "
              "Cohen's d: natural minus control image means over their pooled sd. Intervals: 95% bootstrap over "
              "images (a matched control image and its source drawn together); shares are left out (\u2014) where "
              "r_S's own interval holds 1.")


def _d(r: dict) -> str:
    return fmt_ci({"value": r.get("cohens_d"), "ci_low": r.get("cohens_d_ci_low"),
                   "ci_high": r.get("cohens_d_ci_high")}, 2)


def _share(r: dict, kind: str) -> str:
    share = r.get("share") or {}
    text = fmt_ci(share, 2)
    return DASH if text == DASH else f"{SHARE_NAMES.get(kind, 'share')} {text}"


POOLED_HEADERS = ["control", "n control / synthetic", "H(nat) / H(control) [95% CI]", "Cohen's d [95% CI]", "permutation p",
                  "H(nat) / H(syn)", "share of the ratio [95% CI]"]
TIMESTEP_HEADERS = ["timestep", "H(nat) / H(syn)", "control", "H(nat) / H(control)", "Cohen's d", "share"]


def pooled_rows(controls: Optional[dict]) -> list:
    """One row per control: its pooled comparison with the natural set (POOLED_HEADERS)."""
    rows = []
    for name, c in ((controls or {}).get("by_control") or {}).items():
        r = c["pooled"]
        rows.append([name, f"{r.get('n_control')} / {r.get('n_synthetic')}", fmt_ci(r), _d(r), fmt_p_of(r), fmt_ci(r.get("synthetic_ratio")),
                     _share(r, c["kind"])])
    return rows


def timestep_rows(controls: Optional[dict]) -> list:
    """One row per (timestep, control) (TIMESTEP_HEADERS): where each control's share sits."""
    by_control = (controls or {}).get("by_control") or {}
    steps = sorted({r["timestep"] for c in by_control.values() for r in c["by_timestep"]})
    rows = []
    for t in steps:
        for name, c in by_control.items():
            r = next((r for r in c["by_timestep"] if r["timestep"] == t), None)
            if r is not None:
                rows.append([t, fmt_ci(r.get("synthetic_ratio")), name, fmt_ci(r), _d(r), _share(r, c["kind"])])
    return rows


FRAMING_HEADERS = ["set", "centre x", "centre y", "eye distance", "eyes to mouth", "size"]
FRAMING_SETS = {"natural": "natural (estimated from its mean image)", "synthetic": "synthetic (generator geometry)",
                "framing_estimated": "framing control (estimated as the natural set)"}


def framing_rows(controls: Optional[dict]) -> list:
    """The face boxes (fractions of the frame) behind the framing control."""
    return [[FRAMING_SETS.get(r["set"], r["set"]), fmt(r["x"]), fmt(r["y"]), fmt(r["width"]), fmt(r["height"]),
             fmt(r["size"])] for r in (controls or {}).get("framing") or []]


__all__ = ["DEFINITION", "DESCRIPTIONS", "FRAMING_HEADERS", "POOLED_HEADERS", "TIMESTEP_HEADERS", "framing_rows",
           "pooled_rows", "timestep_rows"]
