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
# what vs_sdpa divides by: the first of these timed in the case (flash refuses f32)
BASELINE = {"cpu": ("sdpa",), "cuda": ("sdpa-flash", "sdpa-efficient")}


def materialising_bytes(b, h, n, d, dtype) -> int:
    """Lower bound of what the materialising path holds at once: scores, probabilities and the
    entropy product, each (B, H, N, N)."""
    return 3 * b * h * n * n * torch.empty((), dtype=dtype).element_size()


def run_op(shapes, dtypes, impls: dict, device: str = "cpu", repeats: int = 5, mem_budget: float | None = None,
           unavailable: dict | None = None, log=print) -> list:
    """Rows of results for every (dtype, shape) x implementation. shapes: (b, h, n, d) tuples; impls:
    name -> fn(case) -> (out (B, H, N, D), entropy (B, H, N) or None). Each implementation is checked
    against the float64 reference first (harness.IncorrectImplementation propagates: a wrong one is
    never timed). With mem_budget (bytes) the materialising path is skipped where it would need more.
    unavailable: name -> reason (an optional baseline "not installed"), listed as a skipped row per
    case. A baseline that cannot run a case (an unsupported dtype or head dim) is skipped too."""
    cuda = device == "cuda"
    time_call, peak = harness.measurers(device)
    rows = []
    for dt, (b, h, n, d) in itertools.product(dtypes, shapes):
        dtype = harness.DTYPES[dt]
        case = harness.make_case(b, h, n, d, dtype, device=device)
        results, ref = [], None
        for name, fn in impls.items():
            row = {"dtype": dt, "b": b, "h": h, "n": n, "d": d, "implementation": name}
            reason = _over_budget(name, (b, h, n, d), dtype, mem_budget)
            if reason is None:
                ref = harness.reference(case) if ref is None else ref
                reason = _measure(row, name, fn, case, dtype, ref, time_call, peak, repeats)
            if reason is None:
                results.append(row)
            else:
                row["skipped"] = reason
                log(f"{dt:5} {n:>6} {d:>4} {name:16} skipped: {reason}")
            rows.append(row)
        for name, reason in (unavailable or {}).items():
            rows.append({"dtype": dt, "b": b, "h": h, "n": n, "d": d, "implementation": name, "skipped": reason})
            log(f"{dt:5} {n:>6} {d:>4} {name:16} skipped: {reason}")
        _ratios(results, BASELINE[device], 4 * b * h * n * n * d, log)
        del case, ref
        if cuda:
            torch.cuda.empty_cache()
        sys.stdout.flush()
    return rows


def _over_budget(name, shape, dtype, mem_budget) -> str | None:
    """Why the materialising path is skipped for a (b, h, n, d) shape, or None."""
    need = materialising_bytes(*shape, dtype)
    if name == "materialising" and mem_budget is not None and need > mem_budget:
        return f"needs >= {need / 2**30:.1f} GiB, over the {mem_budget / 2**30:.1f} GiB budget"
    return None


def _measure(row, name, fn, case, dtype, ref, time_call, peak, repeats) -> str | None:
    """Checks fn against ref, then times it and measures its peak memory into row; returns why it
    was skipped, or None. A wrong result raises harness.IncorrectImplementation; which other
    failures skip the implementation is harness.skip_reason's call (running out of memory, a
    baseline that cannot run the case), the rest propagate."""
    try:
        err = harness.check(name, fn, case, dtype, ref)  # the gate, before any timing
        times = time_call(fn, case, repeats)
        mem = peak(fn, case)
    except Exception as e:
        reason = harness.skip_reason(name, e)
        if reason is None:
            raise
        torch.cuda.empty_cache()
        return reason
    row.update(harness.summarize(times), peak_extra_bytes=mem, max_abs_err=err)
    return None


def _ratios(results: list, baselines: tuple, flops: int, log):
    """Adds GFLOP/s and the time ratio to the first timed of baselines (vs_sdpa, < 1 is faster) to
    each timed row; logs it."""
    timed = {r["implementation"]: r["ms"] for r in results}
    base = next((timed[name] for name in baselines if name in timed), None)
    for r in results:
        r["gflops"] = flops / (r["ms"] * 1e-3) / 1e9
        r["vs_sdpa"] = r["ms"] / base if base else None
        ratio = f"{r['vs_sdpa']:.2f}x" if r["vs_sdpa"] else "-"
        log(f"{r['dtype']:5} {r['n']:>6} {r['d']:>4} {r['implementation']:16} {r['ms']:>9.2f} {r['gflops']:>8.1f} "
            f"{ratio:>8} {r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")


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
