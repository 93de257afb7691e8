"""The op benchmark behind ``diffcirc bench op``: the cases and implementations of
``benchmarks/bench_attention.py`` (from :mod:`diffcirc.bench.harness`), each checked against the
float64 reference before it is timed, plus the scaling study (time and memory vs N)."""

from __future__ import annotations

import itertools
import sys

import torch

from diffcirc.bench import harness

SCALING_NS = [2**k for k in range(8, 15)]  # 256 .. 16384
SCALING_QUICK_NS = [2**k for k in range(8, 12)]  # 256 .. 2048
BASELINE = {"cpu": "sdpa", "cuda": "sdpa-flash"}


def materialising_bytes(b, h, n, d, dtype) -> int:
    """Lower bound of what the materialising path holds at once: scores, probabilities and the
    entropy product, each (B, H, N, N)."""
    return 3 * b * h * n * n * torch.empty((), dtype=dtype).element_size()


def run_op(shapes, dtypes, impls: dict, device: str = "cpu", repeats: int = 5, mem_budget: float | None = None,
           log=print) -> list:
    """Rows of results for every (dtype, shape) x implementation. shapes: (b, h, n, d) tuples; impls:
    name -> fn(case) -> (out, entropy or None). Each implementation is checked against the float64
    reference first (harness.IncorrectImplementation propagates: a wrong one is never timed). With
    mem_budget (bytes) the materialising path is skipped where it would need more."""
    cuda = device == "cuda"
    time_call = harness.cuda_time_call if cuda else harness.time_call
    peak = harness.cuda_peak_extra_memory if cuda else harness.peak_extra_memory
    rows = []
    for dt, (b, h, n, d) in itertools.product(dtypes, shapes):
        dtype = harness.DTYPES[dt]
        case = harness.make_case(b, h, n, d, dtype, device=device)
        flops = 4 * b * h * n * n * d
        results, ref = [], None
        for name, fn in impls.items():
            row = {"dtype": dt, "b": b, "h": h, "n": n, "d": d, "implementation": name}
            need = materialising_bytes(b, h, n, d, dtype)
            if name == "materialising" and mem_budget is not None and need > mem_budget:
                row["skipped"] = f"needs >= {need / 2**30:.1f} GiB, over the {mem_budget / 2**30:.1f} GiB budget"
                log(f"{dt:5} {n:>6} {d:>4} {name:16} skipped: {row['skipped']}")
                rows.append(row)
                continue
            ref = harness.reference(case) if ref is None else ref
            err = harness.check(name, fn, case, dtype, ref)  # the gate, before any timing
            try:
                times = time_call(fn, case, repeats)
                mem = peak(fn, case)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row["skipped"] = "out of memory"
                rows.append(row)
                continue
            row.update(harness.summarize(times), peak_extra_bytes=mem, max_abs_err=err)
            row["gflops"] = flops / (row["ms"] * 1e-3) / 1e9
            results.append(row)
            rows.append(row)
        base = next((r["ms"] for r in results if r["implementation"] == BASELINE[device]), None)
        for r in results:
            r["vs_sdpa"] = r["ms"] / base if base else None
            ratio = f"{r['vs_sdpa']:.2f}x" if r["vs_sdpa"] else "-"
            log(f"{dt:5} {n:>6} {d:>4} {r['implementation']:16} {r['ms']:>9.2f} {r['gflops']:>8.1f} {ratio:>8} "
                f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")
        del case, ref
        if cuda:
            torch.cuda.empty_cache()
        sys.stdout.flush()
    return rows


HEADER = f"{'dtype':5} {'N':>6} {'D':>4} {'implementation':16} {'ms':>9} {'GFLOP/s':>8} {'vs sdpa':>8} {'peak MiB':>9} {'max err':>8}"


def scaling_fits(rows: list) -> list:
    """Per (implementation, dtype, b, h, d): the least-squares exponents of time and peak memory vs N."""
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
                     "points": len(ns), "time_exponent": harness.fit_exponent(ns, [r["ms"] for r in rs]),
                     "memory_exponent": harness.fit_exponent(ns, [r["peak_extra_bytes"] for r in rs])})
    return fits


def format_fits(fits: list) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"{'implementation':16} {'dtype':5} {'D':>4} {'N range':>13} {'time ~ N^':>9} {'memory ~ N^':>11}"]
    for f in fits:
        lines.append(f"{f['implementation']:16} {f['dtype']:5} {f['d']:>4} {f['n_min']:>6}-{f['n_max']:<6} "
                     f"{fmt(f['time_exponent']):>9} {fmt(f['memory_exponent']):>11}")
    return "\n".join(lines)
