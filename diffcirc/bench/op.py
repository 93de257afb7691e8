"""The op benchmark behind ``diffcirc bench op``: every (dtype, shape) x implementation, each
checked against the float64 reference before it is timed, with GFLOP/s, the ratio to the PyTorch
baseline and peak memory; its default cases; the scaling study's sizes."""

from __future__ import annotations

import itertools
import sys

import torch

from diffcirc.bench import cases, gate, implementations, measure

B, H = 2, 8  # batch and heads of a shape given as NxD or N
D = 64  # head dim of a shape given as N
# default cases per device: every N x every head dim, at (B, H)
DEFAULT_NS = {"cpu": (1024, 4096), "cuda": (1024, 4096, 16384)}
DEFAULT_DS = {"cpu": (40, 64, 160), "cuda": (40, 64, 128, 160)}
QUICK_N, QUICK_D = 1024, 64
DEFAULT_DTYPES = {"cpu": ("f32", "bf16"), "cuda": ("f16", "bf16")}
SCALING_DTYPES = {"cpu": ("f32",), "cuda": ("f16", "bf16")}
SCALING_NS = tuple(2**k for k in range(8, 15))  # 256 .. 16384
SCALING_QUICK_NS = tuple(2**k for k in range(8, 12))  # 256 .. 2048
SCALING_SHAPE = (1, 2, 64)  # (b, h, d) of the scaling study unless a shape is given
REPEATS, QUICK_REPEATS = 5, 2  # --scaling times with QUICK_REPEATS too: it has many large cases
MEM_BUDGET_GIB = 4.0  # the materialising path is skipped on the CPU where it would need more
# what vs_sdpa divides by: the first of these timed in the case (flash refuses f32)
BASELINE = {"cpu": ("sdpa",), "cuda": ("sdpa-flash", "sdpa-efficient")}
PEAK_GEMM_N = 2048  # the square GEMM whose rate is the machine's peak beside the table (cpu)
PEAK_REPEATS = 10  # at least this many timed GEMMs per peak: ~0.1 s each, and a shared CPU's slow spells last longer


def parse_shape(text: str, b: int = B, h: int = H) -> tuple:
    """'BxHxNxD' or 'NxD' (B and H given) or 'N' (D = 64) -> (b, h, n, d)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 4:
        return tuple(parts)
    if len(parts) == 2:
        return (b, h, *parts)
    if len(parts) == 1:
        return (b, h, parts[0], D)
    raise ValueError(f"shape {text!r}: expected BxHxNxD, NxD or N")


def default_shapes(device: str, b: int = B, h: int = H, quick: bool = False, scaling: bool = False,
                   given=()) -> list:
    """(b, h, n, d) cases: the given ones; with scaling, N over SCALING_NS (SCALING_QUICK_NS when
    quick) at the first given shape's (b, h, d), or SCALING_SHAPE; else one QUICK case when quick,
    or every DEFAULT_NS x DEFAULT_DS of device."""
    ns = SCALING_QUICK_NS if quick else SCALING_NS
    if scaling:
        b0, h0, d0 = (given[0][0], given[0][1], given[0][3]) if given else SCALING_SHAPE
        return [(b0, h0, n, d0) for n in ns]
    if given:
        return list(given)
    if quick:
        return [(b, h, QUICK_N, QUICK_D)]
    return [(b, h, n, d) for n in DEFAULT_NS[device] for d in DEFAULT_DS[device]]


def default_dtypes(device: str, scaling: bool = False) -> tuple:
    return (SCALING_DTYPES if scaling else DEFAULT_DTYPES)[device]


def materialising_bytes(b, h, n, d, dtype) -> int:
    """Lower bound of what the materialising path holds at once: scores, probabilities and the
    entropy product, each (B, H, N, N)."""
    return 3 * b * h * n * n * torch.empty((), dtype=dtype).element_size()


def run_op(shapes, dtypes, impls: dict, device: str = "cpu", repeats: int = REPEATS, mem_budget: float | None = None,
           unavailable: dict | None = None, log=print) -> list:
    """Rows of results for every (dtype, shape) x implementation. shapes: (b, h, n, d) tuples; impls:
    name -> fn(case) -> (out (B, H, N, D), entropy (B, H, N) or None). Each implementation is checked
    against the float64 reference first (gate.IncorrectImplementation propagates: a wrong one is
    never timed). With mem_budget (bytes) the materialising path is skipped where it would need more.
    unavailable: name -> reason (an optional baseline "not installed"), listed as a skipped row per
    case. A baseline that cannot run a case (an unsupported dtype or head dim) is skipped too."""
    time_call, peak = measure.measurers(device)
    rows = []
    for dt, (b, h, n, d) in itertools.product(dtypes, shapes):
        dtype = cases.DTYPES[dt]
        case = cases.make_case(b, h, n, d, dtype, device=device)
        results, ref = [], None
        for name, fn in impls.items():
            row = {"dtype": dt, "b": b, "h": h, "n": n, "d": d, "implementation": name}
            reason = _over_budget(name, (b, h, n, d), dtype, mem_budget)
            if reason is None:
                ref = gate.reference(case) if ref is None else ref
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
        if device == "cuda":
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
    was skipped, or None. A wrong result raises gate.IncorrectImplementation; which other failures
    skip the implementation is implementations.skip_reason's call (running out of memory, a
    baseline that cannot run the case), the rest propagate."""
    try:
        err = gate.check(name, fn, case, dtype, ref)  # the gate, before any timing
        times = time_call(fn, case, repeats)
        mem = peak(fn, case)
    except Exception as e:
        reason = implementations.skip_reason(name, e)
        if reason is None:
            raise
        torch.cuda.empty_cache()
        return reason
    row.update(measure.summarize(times), peak_extra_bytes=mem, max_abs_err=err)
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


def cost_lines(rows: list) -> list:
    """Per (dtype, N, D) case, where both were timed: how many times faster fused+entropy is than
    the materialising path, and what all statistics cost over the plain fused kernel."""
    by_case: dict = {}
    for r in rows:
        if r.get("ms") is not None:
            by_case.setdefault((r["dtype"], r["n"], r["d"]), {})[r["implementation"]] = r["ms"]
    lines = []
    for (dt, n, d), ms in by_case.items():
        if "materialising" in ms and "fused+entropy" in ms:
            lines.append(f"{dt:5} {n:>6} {d:>4} fused+entropy is {ms['materialising'] / ms['fused+entropy']:.1f}x "
                         "faster than the materialising path")
        if "fused" in ms and "fused+all stats" in ms:
            lines.append(f"{dt:5} {n:>6} {d:>4} all statistics cost {ms['fused+all stats'] / ms['fused']:.2f}x the "
                         "plain fused kernel")
    return lines


def gemm_peak(dtypes, repeats: int = PEAK_REPEATS, n: int = PEAK_GEMM_N, best_of: dict | None = None) -> dict:
    """dtype name -> GFLOP/s of torch.mm on (n, n) x (n, n) in that dtype on the CPU, the best of
    repeats with the current threads: the peak the machine's BLAS (AMX for bf16 where the CPU has it)
    reaches, which the attention rows are compared to (4 B H N^2 D of their FLOPs are GEMM FLOPs).
    best_of: an earlier measurement (the one taken before the table) whose higher rates are kept, so
    a slow spell of a shared CPU at either end does not lower the peak below what the rows reach."""
    peaks = {}
    for dt in dtypes:
        a, b = (torch.randn(n, n).to(cases.DTYPES[dt]) for _ in range(2))
        best = min(measure.time_call(lambda _: torch.mm(a, b), None, repeats, warmup=2))
        peaks[dt] = max(2 * n**3 / best / 1e9, (best_of or {}).get(dt, 0.0))
    return peaks


def peak_lines(rows: list, peaks: dict, n: int = PEAK_GEMM_N) -> list:
    """The GEMM peak of each dtype, then every timed row's share of it (sets row["gemm_peak_pct"])."""
    lines = [f"{dt:5} GEMM peak (torch.mm {n}^3, {torch.get_num_threads()} threads): {g:.0f} GFLOP/s"
             for dt, g in peaks.items()]
    for r in rows:
        if r.get("gflops") is not None and r["dtype"] in peaks:
            r["gemm_peak_pct"] = 100 * r["gflops"] / peaks[r["dtype"]]
            lines.append(f"{r['dtype']:5} {r['n']:>6} {r['d']:>4} {r['implementation']:16} {r['gemm_peak_pct']:5.1f} % "
                         "of the GEMM peak")
    return lines
