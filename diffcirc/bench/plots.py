"""PNG figures of benchmark runs (matplotlib, Agg backend): the op benchmark (time, GFLOP/s and
memory vs N, speed-up bars), the UNet forward passes (time, speed-up and memory bars per case)
and the ablation sweep (throughput and memory vs batch size, speed-up bars)."""

from __future__ import annotations

import os

from .. import files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit is needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_dir: str, name: str, title: str, paths: list):
    path = os.path.join(out_dir, name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    paths.append(path)


def _grouped_bars(ax, rows: list, group, value, spread=None, fmt="{:.2f}"):
    """Bars of value(row), grouped along x by the label group(row) in first-seen order, one colour
    per implementation, each labelled with fmt; spread(row) -> (low, high) adds an error bar."""
    groups = list(dict.fromkeys(group(r) for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        mine = [r for r in rows if r["implementation"] == impl]
        xs = [groups.index(group(r)) + i * width for r in mine]
        heights = [value(r) for r in mine]
        yerr = None
        if spread is not None:  # matplotlib wants the distances below and above each bar
            lows, highs = zip(*(spread(r) for r in mine))
            yerr = [[h - lo for h, lo in zip(heights, lows)], [hi - h for h, hi in zip(heights, highs)]]
        bars = ax.bar(xs, heights, width, yerr=yerr, capsize=2, label=impl)
        ax.bar_label(bars, labels=[fmt.format(h) for h in heights], fontsize=6, padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------
# op benchmark

def _series(rows, key):
    """{(implementation, dtype, d): [(n, value)]} sorted by n, over timed rows."""
    out: dict = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault((r["implementation"], r["dtype"], r["d"]), []).append((r["n"], r[key]))
    return {k: sorted(v) for k, v in out.items()}


def _lines(ax, series, scale=1.0):
    for (impl, dt, d), pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", label=f"{impl} ({dt}, D={d})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_plots(rows: list, out_dir: str, title: str = "") -> list:
    """time_vs_n.png, gflops_vs_n.png, memory_vs_n.png (log-log) and speedup_vs_sdpa.png; returns the paths."""
    plt, paths = _pyplot(), []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, _series(rows, "ms"))
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    _save(plt, fig, out_dir, "time_vs_n.png", title, paths)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, _series(rows, "gflops"))
    ax.set_ylabel("GFLOP/s (4·B·H·N²·D / time)")
    _save(plt, fig, out_dir, "gflops_vs_n.png", title, paths)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mem = {k: [(n, max(v, 1)) for n, v in pts] for k, pts in _series(rows, "peak_extra_bytes").items()}
    _lines(ax, mem, scale=1 / 2**20)
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory (MiB, log)")
    ax.set_title("peak extra memory vs N (log-log): the materialising path holds (N, N) buffers", fontsize=9)
    _save(plt, fig, out_dir, "memory_vs_n.png", title, paths)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    timed = sorted((r for r in rows if r.get("vs_sdpa")), key=lambda r: (r["dtype"], r["d"], r["n"]))
    _grouped_bars(ax, timed, lambda r: f"{r['dtype']}\nN={r['n']}\nD={r['d']}", lambda r: 1 / r["vs_sdpa"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up vs SDPA (>1 is faster)")
    _save(plt, fig, out_dir, "speedup_vs_sdpa.png", title, paths)
    return paths


# ---------------------------------------------------------------------------------------------
# UNet forward passes

def write_unet_plots(rows: list, out_dir: str, title: str = "") -> list:
    """unet_time.png (median ms per implementation per case, min-max bars), unet_speedup_vs_sdpa.png
    and unet_memory.png (peak extra memory); returns the paths."""
    plt, paths = _pyplot(), []
    timed = [r for r in rows if r.get("ms") is not None]
    case = lambda r: r["case"].replace(" ", "\n", 1)  # noqa: E731  (the model on one line, the sizes below)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(ax, timed, case, lambda r: r["ms"], spread=lambda r: (r["ms_min"], r["ms_max"]), fmt="{:.0f}")
    ax.set_ylabel("median time per forward (ms; bars: min-max)")
    _save(plt, fig, out_dir, "unet_time.png", title, paths)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(ax, [r for r in timed if r.get("vs_sdpa")], case, lambda r: 1 / r["vs_sdpa"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up vs diffusers' AttnProcessor2_0 (>1 is faster)")
    _save(plt, fig, out_dir, "unet_speedup_vs_sdpa.png", title, paths)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(ax, timed, case, lambda r: r["peak_extra_bytes"] / 2**20, fmt="{:.0f}")
    ax.set_ylabel("peak extra memory per forward (MiB)")
    _save(plt, fig, out_dir, "unet_memory.png", title, paths)
    return paths


# ---------------------------------------------------------------------------------------------
# ablation sweep

def write_sweep_plots(rows: list, out_dir: str, title: str = "") -> list:
    """sweep_throughput.png (images/s and peak memory vs elements per batched pass, one line per
    number of conditions; one at a time dashed) and sweep_speedup.png (throughput of each batched
    run over one at a time, the line at 1); returns the paths."""
    plt, paths = _pyplot(), []
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, count in enumerate(sorted({r["conditions"] for r in rows})):
        mine = [r for r in rows if r["conditions"] == count]
        batched = sorted((r for r in mine if r["max_batch"] is not None), key=lambda r: r["max_batch"])
        colour = f"C{i}"
        for axis, key, scale in ((ax, "images_per_s", 1.0), (ax_mem, "peak_extra_bytes", 1 / 2**20)):
            axis.plot([r["max_batch"] for r in batched], [r[key] * scale for r in batched], marker="o", color=colour,
                      label=f"batched, {count} conditions")
            for r in mine:
                if r["max_batch"] is None:
                    axis.axhline(r[key] * scale, color=colour, ls="--", lw=1,
                                 label=f"one at a time, {count} conditions")
    ticks = sorted({r["max_batch"] for r in rows if r["max_batch"] is not None})
    for axis in (ax, ax_mem):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("batch elements per pass (max_batch)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    ax.set_ylabel("throughput (condition x image forwards / s)")
    ax_mem.set_ylabel("peak extra memory (MiB)")
    _save(plt, fig, out_dir, "sweep_throughput.png", title, paths)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    label = lambda r: f"{r['conditions']} cond. x {r['images']} img"  # noqa: E731
    named = [dict(r, implementation=f"batched, max_batch {r['max_batch']}") for r in rows if r["max_batch"] is not None]
    _grouped_bars(ax, named, label, lambda r: r["speedup_vs_one_at_a_time"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("throughput over one condition at a time (>1 is faster)")
    _save(plt, fig, out_dir, "sweep_speedup.png", title, paths)
    return paths
