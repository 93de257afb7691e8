"""``render(out_dir)``: report.html (self-contained, figures as base64 PNG) and report.md
(figures as PNG files in ``out_dir/figures/``) from the saved tables and ``summary.json``.

The document is built once as a list of sections (text, tables, figures) and written by two
small writers, so the HTML and the Markdown always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..analysis import metrics
from ..analysis.roles import ROLE_LABELS
from ..analysis.summary import SUMMARY_FILE, read_table, summarise
from ..files import write_text
from . import controls as control_tables
from . import figures, paper
from .formatting import DASH, fmt, fmt_ci, fmt_p, fmt_p_eq, fmt_p_of, fmt_range, mean_sd, role_row

__all__ = ["render", "build"]


# --------------------------------------------------------------------------- document model

@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list
    rows: list
    caption: str = ""
    collapsed: bool = False


@dataclass
class Plot:
    name: str
    fig: object
    caption: str = ""


@dataclass
class Section:
    title: str
    items: list = field(default_factory=list)


def _paper_vs_ours(s: dict) -> Section:
    cr, rc = s.get("complexity_ratio"), s.get("random_control") or {}
    div, deg = s.get("entropy_divergence"), s.get("degradation")
    rdiv = rc.get("entropy_divergence")
    tex = role_row(s.get("role_summary"), "texture_analysis")
    rtex = role_row(rc.get("roles"), "texture_analysis")
    ent, rent = s.get("entropy") or {}, rc.get("entropy") or {}
    circ, att = s.get("circuit"), s.get("attribution_spearman")
    p_lo, p_hi = paper.ENTROPY_DIVERGENCE
    d_lo, d_hi = paper.DEGRADATION_PERCENT
    rows = [
        ["Complexity ratio H(natural) / H(synthetic)", f"{paper.COMPLEXITY_RATIO:.3f}",
         f"{fmt_ci(cr)}; {fmt_p_of(cr)}", fmt_ci(rc.get("complexity_ratio"))],
        ["Entropy divergence across timesteps (JS, nats)", f"{p_lo} \u2013 {p_hi}",
         fmt_range((div or {}).get("min"), (div or {}).get("max")), fmt_range((rdiv or {}).get("min"), (rdiv or {}).get("max"))],
        ["Texture-analysis heads: entropy (nats)", f"{paper.TEXTURE_ENTROPY[0]:.2f} \u00b1 {paper.TEXTURE_ENTROPY[1]:.2f}",
         mean_sd(tex), mean_sd(rtex)],
        ["Single-head ablation degradation", f"{d_lo}% \u2013 {d_hi}%",
         fmt_range((deg or {}).get("min"), (deg or {}).get("max"), 1, "%"), DASH],
        ["Mean head entropy (nats) / normalised", DASH,
         f"{fmt(ent.get('entropy_mean'))} / {fmt(ent.get('normalised_mean'))}",
         f"{fmt(rent.get('entropy_mean'))} / {fmt(rent.get('normalised_mean'))}"],
        ["Minimal circuit size natural / synthetic", DASH,
         (f"{circ.get('natural_size')} / {circ.get('synthetic_size')} = {fmt(circ.get('ratio'))}" if circ else DASH), DASH],
        ["Attribution vs ablation (Spearman \u03c1)", DASH,
         (f"{fmt((att or {}).get('rho'))}; {fmt_p_eq((att or {}).get('p_value'))}; n = {(att or {}).get('n')}"
          if att else DASH), DASH],
    ]
    return Section("The paper's numbers beside ours", [
        Text(f"The column \u201cpaper\u201d holds the numbers reported in \u201c{paper.TITLE}\u201d; the paper gives "
             "no formulas, so \u201cours\u201d uses diffcirc's documented definitions (DESIGN.md, Metrics). "
             "Intervals are 95% bootstrap intervals."),
        Table(["quantity", "paper (reported)", "ours: trained model", "ours: random-weights control"], rows),
        Text(paper.UNIFORM_NOTE),
    ])


def _run_section(s: dict) -> Section:
    meta = s.get("meta") or {}
    rows = [[k, str(meta[k])] for k in sorted(meta) if not isinstance(meta[k], (dict, list))]
    rows += [[k, str(meta[k])] for k in sorted(meta) if isinstance(meta[k], (dict, list))]
    items = [Text(f"Tables found: {', '.join(s.get('tables') or []) or 'none'}.")]
    if rows:
        items.append(Table(["meta", "value"], rows))
    return Section("Run", items)


def _d_ci(d: Optional[dict]) -> str:
    """"d [lo, hi]" of a ratio test's Cohen's d and its bootstrap interval."""
    d = d or {}
    return fmt_ci({"value": d.get("cohens_d"), "ci_low": d.get("cohens_d_ci_low"), "ci_high": d.get("cohens_d_ci_high")},
                  2)


def _ratio_by_timestep(cr: Optional[dict], rc: Optional[dict]) -> list:
    """The complexity ratio of each timestep alone, trained beside the random-weights control: a
    pooled ratio can hide an effect confined to some timesteps."""
    steps = (cr or {}).get("by_timestep") or []
    if not steps:
        return []
    control = {r["timestep"]: r for r in (rc or {}).get("by_timestep") or []}
    rows = [[r["timestep"], fmt_ci(r), _d_ci(r), fmt_p_of(r), fmt_ci(control.get(r["timestep"]))] for r in steps]
    return [Table(["timestep", "ratio [95% CI]", "Cohen's d [95% CI]", "permutation p", "random-weights control"],
                  rows)]


def _controls_section(s: dict) -> Optional[Section]:
    """The matched-stimulus controls beside the complexity ratio: pooled, per timestep, and the face
    boxes the framing control matched."""
    controls = s.get("controls")
    if not controls or not controls.get("by_control"):
        return None
    sets = "; ".join(f"{name}: {control_tables.DESCRIPTIONS.get(name, name)}" for name in controls["by_control"])
    items = [Text(f"Control sets ({sets}), traced like the study's sets on the trained model. "
                  + control_tables.DEFINITION),
             Table(control_tables.POOLED_HEADERS, control_tables.pooled_rows(controls), "Pooled over timesteps."),
             Table(control_tables.TIMESTEP_HEADERS, control_tables.timestep_rows(controls), "Per timestep.")]
    framing = control_tables.framing_rows(controls)
    if framing:
        items.append(Table(control_tables.FRAMING_HEADERS, framing,
                           "Face boxes in fractions of the frame: centre halfway between the eyes' midpoint and the "
                           "mouth, eye distance, eyes-to-mouth distance, size = sqrt of their product. The framing "
                           "control is cropped so that each face's generator box becomes the natural one; its estimated "
                           "row runs the natural set's estimator on the framed images' mean (the eyes are reliable "
                           "there, the mouth less so: a grey synthetic mouth is not darker than every skin tone)."))
    return Section("Matched-stimulus controls of the complexity ratio", items)


def _entropy_sections(out_dir: Path, s: dict, t: dict) -> list:
    out = []
    agg = t.get("aggregates")
    if agg is not None and not agg.empty:
        prof = metrics.entropy_profile(agg, t.get("layers"))
        fig = figures.entropy_heatmaps(prof)
        if fig is not None:
            out.append(Section("Head entropy across timesteps", [
                Plot("entropy_heatmaps", fig, "Mean per-query attention entropy H (nats) per head (rows) and "
                     "timestep (columns); left: trained model, right: random-weights control."),
            ]))
    cr = s.get("complexity_ratio")
    rc = (s.get("random_control") or {}).get("complexity_ratio")
    fig = figures.complexity(cr, rc)
    if fig is not None:
        out.append(Section("Complexity ratio", [
            Plot("complexity_ratio", fig, f"Ours (bootstrap CI over images) and the paper's reported "
                 f"{paper.COMPLEXITY_RATIO} (labelled \u201cpaper\u201d)."),
            Text(f"Ours: {fmt_ci(cr)}, permutation {fmt_p_of(cr)}; Cohen's d {_d_ci(cr)}. "
                 f"Random-weights control: {fmt_ci(rc)}."),
            *_ratio_by_timestep(cr, rc),
        ]))
    controls = _controls_section(s)
    if controls is not None:
        out.append(controls)
    div = s.get("entropy_divergence")
    rdiv = (s.get("random_control") or {}).get("entropy_divergence")
    fig = figures.divergence({"trained": div, "random": rdiv})
    if fig is not None:
        steps = sorted(div["per_timestep"], key=int) if div else []
        null = (div or {}).get("null") or {}
        rnull = (rdiv or {}).get("null") or {}

        def against_null(n: dict, k: str) -> list:  # no columns when neither model has a null
            if not (null or rnull):
                return []
            row = (n.get("per_timestep") or {}).get(k) or {}
            return [fmt(row.get("null_mean"), 4), _p_at_floor(row.get("p_value"), n.get("p_floor"))]

        nulls = ["null mean", "p"] if null or rnull else []
        header = ["timestep", "JS (trained)", *nulls, "H(nat) \u2212 H(syn) (trained)", "JS (random control)", *nulls]
        rows = [[k, fmt(div["per_timestep"].get(k), 4), *against_null(null, k),
                 fmt((div.get("mean_diff") or {}).get(k), 4),
                 fmt(((rdiv or {}).get("per_timestep") or {}).get(k), 4), *against_null(rnull, k)] for k in steps]
        items = [Plot("divergence", fig, "Jensen\u2013Shannon divergence between the synthetic and natural histograms "
                      "of per-query entropy (solid), the mean of its image-label permutation null (dashed); the "
                      "shaded band is the paper's reported range.")]
        if null:
            items.append(Text(
                f"Plug-in JS is biased upwards in finite samples: two samples of one distribution give a "
                f"positive JS. Each timestep's value is therefore tested against {null['n_permutations']} "
                f"permutations of the images' dataset labels (one-sided, p \u2265 {null['p_floor']:.2g}). The trained "
                f"model's JS exceeds its null's 95th percentile at {null['n_beyond_null_q95']} of "
                f"{null['n_timesteps']} timesteps (p < 0.05 at {null['n_significant']}, uncorrected); elsewhere it "
                f"is what sampling alone gives."))
        items.append(Table(header, rows))
        out.append(Section("Entropy divergence across timesteps", items))
    return out


def _p_at_floor(p, floor) -> str:
    """A table cell's p: "\u2264 floor" at a permutation test's floor, else ``fmt_p``."""
    if p is None:
        return DASH
    return f"\u2264 {floor:.2g}" if floor is not None and p <= floor * (1 + 1e-9) else fmt_p(p)


def _degradation_section(s: dict) -> Optional[Section]:
    deg = s.get("degradation")
    if not deg:
        return None
    items = []
    fig = figures.degradation_bars(deg.get("top") or [])
    if fig is not None:
        items.append(Plot("degradation", fig, "Most-degrading single-head ablations (ours) with 95% paired "
                          "bootstrap intervals; the shaded band is the paper's reported 25.6%\u2013128.3%."))
    rows = [[r.get("dataset"), r.get("timestep"), r.get("layer"), r.get("head"), r.get("mode"), fmt(r.get("percent"), 1),
             f"[{fmt(r.get('ci_low'), 1)}, {fmt(r.get('ci_high'), 1)}]", fmt(r.get("loss_clean"), 4),
             fmt(r.get("delta_loss"), 4), fmt_p(r.get("p_value")), fmt_p(r.get("p_holm")), fmt_p(r.get("p_bh")),
             fmt(r.get("family_size"))] for r in deg.get("top") or []]
    items.append(Text(f"Range over heads ({deg.get('mode') or 'all modes'} ablation): "
                      f"{fmt_range(deg.get('min'), deg.get('max'), 1, '%')}; significant at 0.05 after Holm: "
                      f"{deg.get('n_significant_holm')} of {deg.get('n_tests')}, after Benjamini\u2013Hochberg: "
                      f"{deg.get('n_significant_bh')}."))
    items.append(Table(["dataset", "timestep", "layer", "head", "mode", "degradation %", "95% CI", "L clean",
                        "\u0394L", "p (sign-flip)", "p (Holm)", "p (BH)", "family"], rows))
    items.append(Text("p: paired sign-flip permutation test of the mean loss difference over images, the "
                      "test of the degradation itself; Holm and Benjamini\u2013Hochberg adjust within each "
                      "family (dataset, timestep, mode) of that many heads. Percentages at different timesteps "
                      "rest on clean losses that differ: read them with L clean and \u0394L."))
    return Section("Head ablations", items)


def _rule_status(r: dict) -> str:
    """A rule's check for the role table: its status and the random-weights heads it fires on."""
    status = r.get("status")
    if not status:
        return DASH
    if r.get("random_heads"):
        status += f" ({int(r.get('random_matching'))} of {int(r.get('random_heads'))} random-weights heads)"
    if status.startswith("under-powered"):
        status += f"; maps from {fmt(r.get('map_images'), 0)} images"
    return status


def _p_rank_cell(r: dict) -> str:
    """The one-sided rank p, marked where it sits at its floor 1 / (n_sets + 1)."""
    p, floor = r.get("p_rank"), r.get("p_floor")
    if p is not None and floor is not None and p <= floor * (1 + 1e-9):
        return f"\u2264 {fmt_p(floor)} (floor)"
    return fmt_p(p)


def _role_validation_items(val: list) -> list:
    floors = sorted({r["n_sets"] for r in val if r.get("n_sets")})
    rows = [[r["dataset"], ROLE_LABELS.get(r["role"], r["role"]), r["error_name"], r.get("n_sets"),
             fmt(r.get("role_degradation"), 1), f"{fmt(r.get('random_median'), 1)} ({fmt(r.get('random_q95'), 1)})",
             fmt_ci({"value": r.get("difference"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")}, 1),
             r.get("direction") or DASH, _p_rank_cell(r), fmt_p(r.get("p_holm"))] for r in val]
    return [
        Text("Validation: ablating each role's heads against random head sets with as many heads in every layer "
             "and none of the role's (every such set when there are at most --role-control-reps of them, else "
             "that many drawn once per role from the run's seed and the role's name), on the training loss "
             "(eps_mse) and role-relevant errors of the predicted x0. Degradation D: mean over timesteps of "
             "100 \u00d7 (mean error increase) / (mean clean error). p: one-sided rank p in the direction shown, "
             "(1 + sets with D \u2265 the role's) / (n + 1), whose floor is 1 / (n + 1)"
             + (f" (here {', '.join(f'{1 / (n + 1):.2g} for n = {n}' for n in floors)})" if floors else "")
             + "; Holm across roles within (dataset, error). Interval: hierarchical bootstrap (timesteps, then "
             "images within them) of the role's D minus the sets' median. A role with no layer-matched set "
             "(a layer holding more of its heads than not) has no test."),
        Table(["dataset", "role", "error", "random sets", "role D %", "random D % median (95th pct)",
               "difference, points [95% CI]", "alternative", "p (one-sided rank)", "p (Holm)"], rows),
    ]


def _roles_section(s: dict) -> Optional[Section]:
    summ = s.get("role_summary")
    if not summ:
        return None
    ctrl = (s.get("random_control") or {}).get("roles")
    rows = []
    for r in summ:
        c = role_row(ctrl, r["role"])
        paper_col = (f"{paper.TEXTURE_ENTROPY[0]:.2f} \u00b1 {paper.TEXTURE_ENTROPY[1]:.2f}"
                     if r["role"] == "texture_analysis" else DASH)
        rows.append([ROLE_LABELS.get(r["role"], r["role"]), f"{r['n_heads']} ({r.get('n_matching', DASH)})", mean_sd(r),
                     fmt(r.get("normalised_mean")),
                     f"{c['n_heads']} ({c.get('n_matching', DASH)})" if c else DASH, mean_sd(c), _rule_status(r),
                     paper_col])
    items = [
        Text("Primary role per head: the first matching rule in the priority order (diffcirc.analysis.roles); "
             "heads: with that primary role (in brackets: heads whose rule fires at all); entropy mean \u00b1 sd "
             "over the heads with that primary role. Distances are read relative to uniform attention over the "
             "layer's grid, label mass relative to uniform attention on the synthetic faces' part labels alone. "
             "Check: a rule that fires on most random-weights heads is uninformative (it describes the "
             "architecture, not a learned mechanism); edge and texture rules from fewer than 32 images' maps "
             "are under-powered."),
        Table(["role", "heads (trained)", "entropy, nats (trained)", "normalised (trained)", "heads (random)",
               "entropy, nats (random)", "check", "paper (reported)"], rows),
    ]
    heads = s.get("roles") or []
    items.append(Table(["layer", "head", "primary role", "all matching roles", "entropy mean", "entropy sd", "normalised",
                        "distance / uniform"],
                       [[r["layer"], r["head"], ROLE_LABELS.get(r["role"], r["role"]),
                         ", ".join(ROLE_LABELS.get(x, x) for x in r.get("roles") or []) or DASH,
                         fmt(r.get("entropy_mean")), fmt(r.get("entropy_sd")), fmt(r.get("normalised")),
                         fmt(r.get("distance_rel"))] for r in heads],
                       caption="Roles of every head (trained model)", collapsed=True))
    val = s.get("role_validation")
    if val:
        items += _role_validation_items(val)
    return Section("Functional head roles", items)


def _circuit_section(s: dict) -> Optional[Section]:
    c = s.get("circuit")
    if not c:
        return None
    rows = [[ds, (c.get(f"{ds}_size")), (c.get("n_heads") or {}).get(ds), fmt((c.get("final_degradation") or {}).get(ds), 1)]
            for ds in ("synthetic", "natural")]
    config = (s.get("meta") or {}).get("config") or {}
    threshold = config.get("circuit_threshold")
    mode = c.get("ablation") or config.get("circuit_ablation") or "zero"
    items = [
        Text("Greedy head pruning (least single-head effect first) while the degradation stays under the threshold"
             f"{'' if threshold is None else f' of {fmt(threshold, 1)}%'}, selected on one split of each dataset's "
             f"ablation images at t = {_selection_timesteps(c)}, {_removal_text(mode, 'search')}. Size ratio "
             f"natural / synthetic: {fmt(c.get('ratio'))}."),
        Table(["dataset", "heads kept", "heads tried", "degradation at last removal (%)"], rows),
    ]
    items += [Text(t) for t in (_overlap_text(c), _resamples_text(c.get("resamples"))) if t]
    fig = figures.circuit_curve(c.get("curve"), c.get("evaluation"), threshold)
    if fig is not None:
        items.append(Plot("circuit_curve", fig, "Each accepted removal of the greedy trace (selection split): read "
                          "at a lower threshold, the size where the line first reaches it bounds that run's circuit "
                          "size from above. Squares: the same circuit on the held-out images."))
    if c.get("evaluation"):
        items += _circuit_evaluation(c["evaluation"], mode)
    return Section("Minimal circuits", items)


def _removal_text(mode: str, where: str) -> str:
    """How the circuit's removed heads are ablated, in the search (where "search") or in the
    evaluation (where "evaluation")."""
    if mode != "mean":
        return "removed heads zero-ablated" if where == "search" else "zero-ablated"
    if where == "search":
        return ("removed heads mean-ablated: each replaced by its mean output per position over the selection "
                "images at that timestep (in sample: the search runs on those images)")
    return ("mean-ablated (each replaced by its mean output per position over the selection images at that "
            "timestep: a held-out reference for the held-out images and the random sets)")


def _selection_timesteps(c: dict) -> str:
    steps = sorted({t for t in (c.get("selection_timestep") or {}).values() if t is not None})
    return ", ".join(map(str, steps)) or DASH


def _overlap_text(c: dict) -> str:
    o = c.get("overlap")
    if not o:
        return ""
    return (f"The two datasets' circuits share {o.get('intersection')} of the {o.get('union')} heads in either "
            f"(Jaccard {fmt(o.get('jaccard'), 2)}).")


def _resamples_text(r: Optional[dict]) -> str:
    if not r:
        return ""
    parts = [f"{ds} {fmt(v.get('jaccard_mean'), 2)} ({fmt(v.get('jaccard_min'), 2)}–{fmt(v.get('jaccard_max'), 2)}; "
             f"sizes {', '.join(map(str, v.get('sizes') or []))})" for ds, v in sorted(r.items())]
    n = max(v.get("n", 0) for v in r.values())
    return (f"Stability: the circuit searched again on {n} bootstrap resamples of the selection images; Jaccard "
            f"with the circuit of the whole split, mean (min–max): {'; '.join(parts)}.")


def _circuit_evaluation(rows: list, mode: str = "zero") -> list:
    """The circuit's degradation in and out of sample at each ablation timestep, beside random head
    sets of the same size on the same held-out images; mode: the circuit's ablation (zero | mean)."""
    table = [[r["dataset"], f"{r['timestep']}{' *' if r.get('selected') else ''}", r.get("n_removed"),
              f"{r.get('n_selection')} / {r.get('n_heldout')}", fmt(r.get("selection_percent"), 1),
              fmt_ci({"value": r.get("heldout_percent"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")}, 1),
              (f"{fmt(r.get('random_median'), 1)} [{fmt(r.get('random_q05'), 1)}, {fmt(r.get('random_q95'), 1)}]"
               if r.get("random_n") else DASH),
              f"{r['rank']} / {r['random_n'] + 1}" if r.get("rank") is not None else DASH, fmt_p(r.get("p_value"))]
             for r in rows]
    return [
        Text(f"Held out: the heads outside each circuit {_removal_text(mode, 'evaluation')}"
             " on the selection images (in sample) and on the held-out images (their own noise draws), at every "
             "ablation timestep (* the selection timestep), with "
             "a 95% paired bootstrap CI over held-out images; beside it random sets of as many heads, drawn once "
             "from the seed, on the same held-out images. Rank: the circuit's place among them, least degrading "
             "first (ties against it); p = rank / (sets + 1), one-sided: how often random heads removed cost as "
             "little as everything outside the circuit."),
        Table(["dataset", "timestep", "heads removed", "images sel. / held out", "selection (%)",
               "held out (%) [95% CI]", "random sets: median [5%, 95%]", "rank", "p"], table),
    ]


def _maps_section(out_dir: Path, t: dict) -> Optional[Section]:
    fig = figures.entropy_maps(t.get("maps"), t.get("layers"), out_dir / "samples")
    if fig is None:
        return None
    return Section("Per-query entropy maps", [
        Plot("entropy_maps", fig, "Sample images (left) and per-query entropy maps of a few heads, drawn on the "
             "layer's query grid."),
    ])


def _attribution_section(s: dict, t: dict) -> Optional[Section]:
    att, abl = t.get("attribution"), t.get("ablations")
    a = s.get("attribution_spearman")
    if att is None or abl is None or att.empty or abl.empty or not a:
        return None
    deg = metrics.degradation(abl, n_resamples=0)
    pairs = metrics.attribution_agreement(att, deg)["pairs"]
    fig = figures.attribution_scatter(pairs, a.get("rho"))
    rows = [[g["dataset"], g["timestep"], fmt(g.get("rho")), fmt_p(g.get("p_value")), fmt(g.get("rho_magnitude")),
             fmt_p(g.get("p_magnitude")), g.get("n")] for g in a.get("per_group") or []]
    mag = a.get("magnitude") or {}
    items = [Text("Spearman \u03c1 between the attribution's first-order estimate of a zero ablation (\u2212score) "
                  f"and the measured degradation, pooled: {fmt(a.get('rho'))} ({fmt_p_eq(a.get('p_value'))}, "
                  f"n = {a.get('n')}); between their magnitudes: {fmt(mag.get('rho'))} "
                  f"({fmt_p_eq(mag.get('p_value'))}). Pooled values mix timesteps whose clean losses differ: "
                  "the table gives each (dataset, timestep) alone.")]
    ig = a.get("integrated")
    if ig:
        ig_mag = ig.get("magnitude") or {}
        items.append(Text("Integrated gradients over the gates (every head's gate from 0 to 1 together; each "
                          "head's share of ablating all of them): signed \u03c1 "
                          f"{fmt(ig.get('rho'))} ({fmt_p_eq(ig.get('p_value'))}, n = {ig.get('n')}), magnitudes "
                          f"{fmt(ig_mag.get('rho'))} ({fmt_p_eq(ig_mag.get('p_value'))})."))
    if fig is not None:
        items.insert(0, Plot("attribution", fig, "One point per (dataset, timestep, head)."))
    items.append(Table(["dataset", "timestep", "\u03c1 signed", "p", "\u03c1 magnitude", "p", "n"], rows))
    return Section("Attribution patching vs ablation", items)


def build(out_dir: Path, summary: dict) -> list:
    """The report's sections, from the tables in out_dir and the summary."""
    tables = {name: read_table(out_dir, name)
              for name in ("aggregates", "layers", "histograms", "maps", "attribution", "ablations")}
    tables["layers"] = metrics.complete_layers(tables["layers"], tables.pop("histograms"))
    sections = [_paper_vs_ours(summary)]
    sections += _entropy_sections(out_dir, summary, tables)
    for sec in (_degradation_section(summary), _roles_section(summary), _circuit_section(summary),
                _maps_section(out_dir, tables), _attribution_section(summary, tables)):
        if sec is not None:
            sections.append(sec)
    sections.append(_run_section(summary))
    return sections


# --------------------------------------------------------------------------- writers

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
details{margin:.8em 0}
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    out = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if t.collapsed:
        return f"<details><summary>{html.escape(t.caption or 'table')}</summary>{out}</details>"
    return (f"<p><em>{html.escape(t.caption)}</em></p>" if t.caption else "") + out


def _md_cell(c) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
    lines.append("|" + "|".join("---" for _ in t.headers) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _describe(value) -> str:
    """A meta entry in a few words: {"natural": {"spec": "lfw", "n": 20}} -> "natural: lfw (n=20)"."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, dict) and "spec" in v:
                parts.append(f"{k}: {v['spec']}" + (f" (n={v['n']})" if "n" in v else ""))
            else:
                parts.append(f"{k}: {v}")
        return ", ".join(parts)
    return str(value)


def render(out_dir, summary: Optional[dict] = None, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` into out_dir.

    summary: the ``summarise`` dict; None reads ``out_dir/summary.json`` or, when that does not
    exist, runs ``summarise(out_dir, n_resamples, seed)`` (which writes it). Returns the paths
    {"html", "md", "figures": [png paths]}.
    """
    out_dir = Path(out_dir)
    if summary is None:
        path = out_dir / SUMMARY_FILE
        if path.is_file():
            with open(path) as f:
                summary = json.load(f)
        else:
            summary = summarise(out_dir, n_resamples=n_resamples, seed=seed)
    sections = build(out_dir, summary)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)

    meta = summary.get("meta") or {}
    subtitle = " \u00b7 ".join(_describe(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
    html_parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                  "<title>diffcirc report</title>", f"<style>{_CSS}</style></head><body>",
                  "<h1>diffcirc report: synthetic vs natural faces</h1>"]
    md_parts = ["# diffcirc report: synthetic vs natural faces", ""]
    if subtitle:
        html_parts.append(f"<p>{html.escape(subtitle)}</p>")
        md_parts += [subtitle, ""]
    pngs = []
    for sec in sections:
        html_parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        md_parts += [f"## {sec.title}", ""]
        for item in sec.items:
            if isinstance(item, Text):
                html_parts.append(f"<p>{html.escape(item.text)}</p>")
                md_parts += [item.text, ""]
            elif isinstance(item, Table):
                html_parts.append(_html_table(item))
                md_parts += [_md_table(item), ""]
            elif isinstance(item, Plot):
                data = figures.png_bytes(item.fig)
                png = fig_dir / f"{item.name}.png"
                png.write_bytes(data)
                pngs.append(png)
                b64 = base64.b64encode(data).decode("ascii")
                html_parts.append(f"<figure><img alt='{html.escape(item.name)}' src='data:image/png;base64,{b64}'>"
                                  f"<figcaption>{html.escape(item.caption)}</figcaption></figure>")
                md_parts += [f"![{item.name}](figures/{item.name}.png)", "", f"*{item.caption}*", ""]
    html_parts.append("</body></html>")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text("\n".join(html_parts), html_path)
    write_text("\n".join(md_parts), md_path)
    return {"html": html_path, "md": md_path, "figures": pngs}
