"""PNG figures of an op benchmark run (matplotlib, Agg backend)."""

from __future__ import annotations

import os


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, _series(rows, "ms"))
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    save(fig, "time_vs_n.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, _series(rows, "gflops"))
    ax.set_ylabel("GFLOP/s (4·B·H·N²·D / time)")
    save(fig, "gflops_vs_n.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mem = {k: [(n, max(v, 1)) for n, v in pts] for k, pts in _series(rows, "peak_extra_bytes").items()}
    _lines(ax, mem, scale=1 / 2**20)
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory (MiB, log)")
    ax.set_title("peak extra memory vs N (log-log): the materialising path holds (N, N) buffers", fontsize=9)
    save(fig, "memory_vs_n.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    timed = [r for r in rows if r.get("vs_sdpa")]
    cases = sorted({(r["dtype"], r["n"], r["d"]) for r in timed}, key=lambda c: (c[0], c[2], c[1]))
    impls = list(dict.fromkeys(r["implementation"] for r in timed))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        speed = {(r["dtype"], r["n"], r["d"]): 1 / r["vs_sdpa"] for r in timed if r["implementation"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [speed.get(c, 0) for c in cases], width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{dt}\nN={n}\nD={d}" for dt, n, d in cases], fontsize=7)
    ax.set_ylabel("speed-up vs SDPA (>1 is faster)")
    ax.legend(fontsize=7)
    save(fig, "speedup_vs_sdpa.png")
    return paths
