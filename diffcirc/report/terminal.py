"""``print_summary(summary)``: the key numbers as a plain-text table for the terminal."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from . import controls as control_tables
from . import paper
from .formatting import DASH, fmt, fmt_ci, fmt_p, fmt_p_of, fmt_range, mean_sd, role_row


def _table(headers: list, rows: list) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(headers, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def print_summary(summary: dict, file: Optional[TextIO] = None) -> None:
    """Print the summary's key numbers beside the paper's (labelled) and the random-weights control."""
    file = file or sys.stdout
    s = summary
    rc = s.get("random_control") or {}
    cr = s.get("complexity_ratio")
    div, rdiv = s.get("entropy_divergence") or {}, rc.get("entropy_divergence") or {}
    deg = s.get("degradation") or {}
    circ = s.get("circuit")
    att = s.get("attribution_spearman")
    rows = [
        ["complexity ratio nat/syn", f"{paper.COMPLEXITY_RATIO:.3f}",
         f"{fmt_ci(cr)} {fmt_p_of(cr)}", fmt_ci(rc.get("complexity_ratio"))],
        ["entropy divergence (JS, nats)", f"{paper.ENTROPY_DIVERGENCE[0]} - {paper.ENTROPY_DIVERGENCE[1]}",
         fmt_range(div.get("min"), div.get("max")), fmt_range(rdiv.get("min"), rdiv.get("max"))],
        ["texture-analysis heads H (nats)", f"{paper.TEXTURE_ENTROPY[0]:.2f} +- {paper.TEXTURE_ENTROPY[1]:.2f}",
         mean_sd(role_row(s.get("role_summary"), "texture_analysis")),
         mean_sd(role_row(rc.get("roles"), "texture_analysis"))],
        ["ablation degradation", f"{paper.DEGRADATION_PERCENT[0]}% - {paper.DEGRADATION_PERCENT[1]}%",
         fmt_range(deg.get("min"), deg.get("max"), 1, "%"), DASH],
        ["mean head entropy (nats)", DASH, fmt((s.get("entropy") or {}).get("entropy_mean")),
         fmt((rc.get("entropy") or {}).get("entropy_mean"))],
        ["circuit size nat/syn", DASH,
         f"{circ.get('natural_size')}/{circ.get('synthetic_size')} = {fmt(circ.get('ratio'))}" if circ else DASH, DASH],
        ["attribution vs ablation rho", DASH, fmt((att or {}).get("rho")) if att else DASH, DASH],
    ]
    print(f"paper: \"{paper.TITLE}\"", file=file)
    print(_table(["quantity", "paper (reported)", "ours: trained", "ours: random weights"], rows), file=file)
    controls = s.get("controls")
    if controls and controls.get("by_control"):
        print(file=file)
        print(_table(control_tables.POOLED_HEADERS, control_tables.pooled_rows(controls)), file=file)
        print(file=file)
        print(_table(control_tables.TIMESTEP_HEADERS, control_tables.timestep_rows(controls)), file=file)
    roles = s.get("role_summary")
    if roles:
        ctrl = rc.get("roles")
        print(file=file)
        print(_table(["role", "trained: H mean +- sd", "random: H mean +- sd", "check"],
                     [[r["role"], mean_sd(r), mean_sd(role_row(ctrl, r["role"])), r.get("status") or DASH]
                      for r in roles if r["n_heads"] or (role_row(ctrl, r["role"]) or {}).get("n_heads")]), file=file)
    top = deg.get("top") or []
    if top:
        print(file=file)
        print(_table(["dataset", "t", "layer", "head", "degradation %", "95% CI", "p (Holm)"],
                     [[r["dataset"], r["timestep"], r["layer"], r["head"], fmt(r["percent"], 1),
                       f"[{fmt(r['ci_low'], 1)}, {fmt(r['ci_high'], 1)}]", fmt_p(r.get("p_holm"))] for r in top]),
              file=file)
    wall = (s.get("meta") or {}).get("wall_time_s")
    if wall is not None:
        print(f"\nwall time: {wall:.1f} s" if isinstance(wall, (int, float)) else f"\nwall time: {wall}", file=file)
