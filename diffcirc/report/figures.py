"""The report's figures: each function takes saved tables or summary parts and returns a
matplotlib ``Figure`` drawn on the Agg canvas (no pyplot, no global state), or None when there
is nothing to draw. The paper's numbers appear only as clearly labelled reference marks."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from . import paper

PAPER_COLOUR = "#b36b00"
MODEL_COLOURS = {"trained": "#1f5fa8", "random": "#7f7f7f"}
DATASET_COLOURS = {"synthetic": "#d1495b", "natural": "#2e8b57"}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(layer: str) -> str:
    """down_blocks.1.attentions.0.transformer_blocks.0.attn1 -> d1.a0.t0.attn1 (labels only)."""
    parts = str(layer).split(".")
    abbrev = {"down_blocks": "d", "up_blocks": "u", "mid_block": "m", "attentions": "a", "transformer_blocks": "t"}
    out, i = [], 0
    while i < len(parts):
        p = parts[i]
        if p in abbrev and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{abbrev[p]}{parts[i + 1]}")
            i += 2
        else:
            out.append(abbrev.get(p, p))
            i += 1
    return ".".join(out)


def head_label(layer, head) -> str:
    return f"{_short(layer)}/h{int(head)}"


def _colorbar(fig: Figure, mappable, ax, label: str, **kwargs):
    bar = fig.colorbar(mappable, ax=ax, **kwargs)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return bar


def entropy_heatmaps(profile: pd.DataFrame, datasets=("synthetic", "natural")) -> Optional[Figure]:
    """Heads x timesteps heatmaps of H (nats), side by side: for the trained model, then the
    random-weights control, the panels synthetic, natural, natural - synthetic. One colour scale
    for every H panel; each difference panel has its own symmetric scale."""
    if profile is None or profile.empty:
        return None
    if "model" not in profile.columns:
        profile = profile.assign(model="trained")
    models = [m for m in ("trained", "random") if (profile["model"] == m).any()]
    if not models:
        return None
    grids = {}
    for m in models:
        p = profile[profile["model"] == m]
        for ds in datasets:
            grids[(m, ds)] = p[p["dataset"] == ds].pivot_table(index=["layer", "head"], columns="timestep",
                                                               values="entropy_mean")
    heads = sorted(set().union(*[set(g.index) for g in grids.values()]))
    steps = sorted(set().union(*[set(g.columns) for g in grids.values()]))
    if not heads or not steps:
        return None
    index = pd.MultiIndex.from_tuples(heads)
    mats = {k: g.reindex(index=index, columns=steps).to_numpy(dtype=float) for k, g in grids.items()}
    values = np.concatenate([v.ravel() for v in mats.values()])
    if not np.isfinite(values).any():
        return None
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    fig = new_figure(2.6 * 3 * len(models) + 1.2, min(2.2 + 0.15 * len(heads), 20.0))
    axes = fig.subplots(1, 3 * len(models), squeeze=False, sharey=True)[0]
    labels = [head_label(layer, h) for layer, h in heads]
    for r, m in enumerate(models):
        diff = mats[(m, datasets[1])] - mats[(m, datasets[0])]
        lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
        lim = lim if lim > 0 else 1.0
        panels = [(mats[(m, datasets[0])], datasets[0], "viridis", vmin, vmax),
                  (mats[(m, datasets[1])], datasets[1], "viridis", vmin, vmax),
                  (diff, f"{datasets[1][:3]} \u2212 {datasets[0][:3]}", "RdBu_r", -lim, lim)]
        for c, (mat, title, cmap, lo, hi) in enumerate(panels):
            ax = axes[3 * r + c]
            im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{'random weights' if m == 'random' else m}:\n{title}", fontsize=8)
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=6, rotation=90)
            ax.set_xlabel("timestep", fontsize=7)
            if c == 2:
                _colorbar(fig, im, ax, "\u0394 entropy (nats)", shrink=0.6)
    axes[0].set_ylabel("layer/head", fontsize=8)
    if len(labels) <= 80:
        axes[0].set_yticks(range(len(labels)), labels, fontsize=6)
    _colorbar(fig, axes[1].images[0], list(axes), "entropy (nats)", location="bottom", shrink=0.4, aspect=40)
    return fig


def divergence(per_model: dict) -> Optional[Figure]:
    """Pooled JS divergence (and mean difference) vs timestep per model, its permutation null's
    mean where the summary has one (dashed), with the paper's range as a labelled band.
    per_model: {model: summary["entropy_divergence"]-like dict}."""
    per_model = {m: d for m, d in per_model.items() if d and d.get("per_timestep")}
    if not per_model:
        return None
    fig = new_figure(7.5, 5.0)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    lo, hi = paper.ENTROPY_DIVERGENCE
    ax.axhspan(lo, hi, color=PAPER_COLOUR, alpha=0.15, label=f"paper's range across timesteps ({lo}\u2013{hi})")
    for m, d in per_model.items():
        t = sorted(d["per_timestep"], key=lambda k: int(k))
        x = [int(k) for k in t]
        y = [np.nan if d["per_timestep"][k] is None else d["per_timestep"][k] for k in t]
        ax.plot(x, y, "o-", color=MODEL_COLOURS.get(m), label=f"ours: {m}")
        null = (d.get("null") or {}).get("per_timestep") or {}
        if null:
            y0 = [np.nan if (null.get(k) or {}).get("null_mean") is None else null[k]["null_mean"] for k in t]
            ax.plot(x, y0, "--", color=MODEL_COLOURS.get(m), lw=1, label=f"{m}: permutation null mean")
        md = d.get("mean_diff") or {}
        y2 = [np.nan if md.get(k) is None else md[k] for k in t]
        ax2.plot(x, y2, "o-", color=MODEL_COLOURS.get(m), label=f"ours: {m}")
    ax.set_ylabel("JS divergence (nats)")
    ax.set_title("Entropy divergence synthetic vs natural (pooled per layer, mean over layers)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_ylabel("H(nat) \u2212 H(syn) (nats)")
    ax2.set_xlabel("timestep")
    return fig


def degradation_bars(top: list) -> Optional[Figure]:
    """Most-degrading heads with bootstrap CIs; the paper's reported range as a labelled band."""
    if not top:
        return None
    rows = list(reversed(top))
    y = np.arange(len(rows))
    pct = np.array([np.nan if r["percent"] is None else r["percent"] for r in rows], dtype=float)
    lo = np.array([np.nan if r.get("ci_low") is None else r["ci_low"] for r in rows], dtype=float)
    hi = np.array([np.nan if r.get("ci_high") is None else r["ci_high"] for r in rows], dtype=float)
    err = np.vstack([np.where(np.isfinite(lo), pct - lo, 0), np.where(np.isfinite(hi), hi - pct, 0)])
    fig = new_figure(7.5, 1.2 + 0.3 * len(rows))
    ax = fig.subplots()
    plo, phi = paper.DEGRADATION_PERCENT
    ax.axvspan(plo, phi, color=PAPER_COLOUR, alpha=0.15, label=f"paper's reported range ({plo}%\u2013{phi}%)")
    colours = [DATASET_COLOURS.get(r.get("dataset"), "#444") for r in rows]
    ax.barh(y, pct, xerr=np.clip(err, 0, None), color=colours, capsize=3)
    ax.set_yticks(y, [f"{r.get('dataset')} t={r.get('timestep')} {head_label(r['layer'], r['head'])}" for r in rows],
                  fontsize=7)
    ax.set_xlabel("degradation of the training loss (%), 95% paired bootstrap CI")  # ε, v or flow-target MSE
    ax.set_title("Ours: most-degrading single-head ablations", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def circuit_curve(curve: Optional[dict], evaluation: Optional[list], threshold: Optional[float]) -> Optional[Figure]:
    """Size vs threshold of each dataset's circuit: the selection split's degradation after each
    accepted removal of the greedy trace (a line per dataset), and at the final size the held-out
    degradation at the selection timestep with its 95% CI (a marker), the threshold dashed."""
    curve = {ds: pts for ds, pts in (curve or {}).items() if pts}
    if not curve:
        return None
    fig = new_figure(6.0, 3.4)
    ax = fig.subplots()
    held = {r["dataset"]: r for r in evaluation or [] if r.get("selected")}
    for ds, pts in sorted(curve.items()):
        colour = DATASET_COLOURS.get(ds, "#444")
        x = [0] + [p["removed"] for p in pts]
        ax.plot(x, [0.0] + [p["degradation"] for p in pts], "-o", color=colour, markersize=3,
                label=f"{ds}: selection split")
        r = held.get(ds)
        if r and r.get("heldout_percent") is not None:
            v, lo, hi = r["heldout_percent"], r.get("ci_low"), r.get("ci_high")
            err = None if lo is None or hi is None else [[max(v - lo, 0.0)], [max(hi - v, 0.0)]]
            ax.errorbar([x[-1]], [v], yerr=err, fmt="s", color=colour, mfc="white", capsize=4,
                        label=f"{ds}: held out (95% CI)")
    if threshold is not None:
        ax.axhline(threshold, color="k", lw=0.6, ls="--")
    ax.set_xlabel("heads removed (circuit size = heads − removed)")
    ax.set_ylabel("degradation of the training loss (%)")
    ax.set_title("Greedy pruning trace and the circuit on held-out images", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def complexity(ours: Optional[dict], control: Optional[dict]) -> Optional[Figure]:
    """Complexity ratio as points with 95% CIs: ours, the random-weights control, the paper's value."""
    if not ours and not control:
        return None
    fig = new_figure(5.5, 3.2)
    ax = fig.subplots()
    items = [(label, d, colour) for label, d, colour in (("ours: trained", ours, MODEL_COLOURS["trained"]),
                                                         ("ours: random weights", control, MODEL_COLOURS["random"]))
             if d and d.get("value") is not None]
    items.append(("paper (reported)", {"value": paper.COMPLEXITY_RATIO}, PAPER_COLOUR))
    values = []
    for x, (label, d, colour) in enumerate(items):
        v, lo, hi = d["value"], d.get("ci_low"), d.get("ci_high")
        values += [v for v in (v, lo, hi) if v is not None]
        err = None if lo is None or hi is None else [[max(v - lo, 0.0)], [max(hi - v, 0.0)]]
        ax.errorbar([x], [v], yerr=err, fmt="D" if label.startswith("paper") else "o", color=colour, capsize=5,
                    markersize=7)
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xticks(range(len(items)), [label for label, _, _ in items], fontsize=8)
    ax.set_xlim(-0.5, len(items) - 0.5)
    span = max(abs(v - 1.0) for v in values) or 0.05
    ax.set_ylim(1.0 - 1.3 * span, 1.0 + 1.3 * span)
    ax.set_ylabel("H(natural) / H(synthetic)")
    ax.set_title("Complexity ratio (95% bootstrap CI; dashed: no difference)", fontsize=9)
    return fig


def attribution_scatter(pairs: Optional[pd.DataFrame], rho: Optional[float]) -> Optional[Figure]:
    """|attribution score| vs measured zero-ablation degradation, one point per (dataset, timestep, head)."""
    if pairs is None or pairs.empty:
        return None
    fig = new_figure(5.5, 4.0)
    ax = fig.subplots()
    for ds, g in pairs.groupby("dataset", sort=True):
        ax.scatter(g["x"], g["percent"], s=14, alpha=0.8, color=DATASET_COLOURS.get(ds), label=ds)
    ax.set_xlabel("|attribution score| (d loss / d head scale)")
    ax.set_ylabel("zero-ablation degradation (%)")
    rho_text = "n/a" if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{rho:.3f}"
    ax.set_title(f"Attribution patching vs ablation (Spearman \u03c1 = {rho_text})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _map_values(maps: pd.DataFrame) -> pd.DataFrame:
    if "entropy" in maps.columns:
        return maps.rename(columns={"entropy": "_v"})
    if "stat" in maps.columns and "value" in maps.columns:
        return maps[maps["stat"] == "entropy"].rename(columns={"value": "_v"})
    return maps.iloc[0:0].assign(_v=[])


def _grid_of(layer: str, q: pd.DataFrame, layers: Optional[pd.DataFrame]) -> tuple:
    """(hq, wq) of one head's map: from its row/col columns, else layers' grid_h/grid_w, else square."""
    n = len(q)
    if {"row", "col"} <= set(q.columns) and len(q) and q["row"].min() >= 0:
        h, w = int(q["row"].max()) + 1, int(q["col"].max()) + 1
        if h * w == n:
            return h, w
    if layers is not None and len(layers) and {"grid_h", "grid_w"} <= set(layers.columns):
        row = layers[layers["layer"] == layer]
        if len(row):
            h, w = pd.to_numeric(row[["grid_h", "grid_w"]].iloc[0], errors="coerce")
            if np.isfinite(h) and np.isfinite(w) and int(h) * int(w) == n:
                return int(h), int(w)
    s = int(round(math.sqrt(n)))
    return (s, n // s) if s > 0 and s * (n // s) == n else (1, n)


def entropy_maps(maps: Optional[pd.DataFrame], layers: Optional[pd.DataFrame], samples_dir: Path,
                 images_per_dataset: int = 2, heads: int = 4) -> Optional[Figure]:
    """Per-query entropy maps (hq x wq) of a few heads of one layer at one timestep (the middle
    recorded one) next to each sample image, for the trained model."""
    if maps is None or maps.empty:
        return None
    m = _map_values(maps)
    if "model" in m.columns and (m["model"] == "trained").any():
        m = m[m["model"] == "trained"]
    if m.empty:
        return None
    layer = sorted(m["layer"].unique())[0]
    m = m[m["layer"] == layer]
    if "timestep" in m.columns:
        steps = sorted(m["timestep"].unique())
        t = steps[len(steps) // 2]
        m = m[m["timestep"] == t]
    else:
        t = None
    head_ids = sorted(m["head"].unique())[:heads]
    picks = []
    for ds in sorted(m["dataset"].unique()):
        for image in sorted(m.loc[m["dataset"] == ds, "image"].unique())[:images_per_dataset]:
            picks.append((ds, image))
    if not picks:
        return None
    ncol = 1 + len(head_ids)
    fig = new_figure(1.9 * ncol + 0.6, 1.9 * len(picks) + 0.5)
    axes = fig.subplots(len(picks), ncol, squeeze=False)
    for r, (ds, image) in enumerate(picks):
        ax = axes[r, 0]
        path = Path(samples_dir) / f"{ds}_{image}.png"
        if path.is_file():
            img = imread(str(path))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        else:
            ax.text(0.5, 0.5, "no sample\nimage", ha="center", va="center", fontsize=7)
        ax.set_title(f"{ds} #{image}", fontsize=8)
        ax.axis("off")
        sel = m[(m["dataset"] == ds) & (m["image"] == image)]
        for c, h in enumerate(head_ids, start=1):
            ax = axes[r, c]
            q = sel[sel["head"] == h].sort_values("query")
            ax.axis("off")
            if q.empty:
                continue
            hq, wq = _grid_of(layer, q, layers)
            im = ax.imshow(q["_v"].to_numpy(dtype=float).reshape(hq, wq), cmap="magma", interpolation="nearest")
            ax.set_title(f"h{int(h)}", fontsize=8)
            _colorbar(fig, im, ax, "", shrink=0.7)
    fig.suptitle(f"Per-query entropy (nats), layer {_short(layer)}" + (f", t={t}" if t is not None else ""), fontsize=9)
    return fig
