"""Measurement pieces shared by ``benchmarks/bench_attention.py``, ``benchmarks/bench_unet.py`` and
``diffcirc bench``: the op implementations and cases, timing (warm-up, repeats, median, min/max),
peak extra memory, machine info, the correctness gate, JSON/CSV writing, comparing two runs and
fitting scaling exponents. Never queries the GPU at import time."""

from __future__ import annotations

import csv
import ctypes
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time

import torch
import torch.nn.functional as F

from diffcirc.ops import STAT_NAMES as ALL_STATS
from diffcirc.ops import attention, extension, reference_attention

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


class IncorrectImplementation(AssertionError):
    """An implementation's output disagrees with the reference; it is refused before timing."""


# ---------------------------------------------------------------------------------------------
# op implementations: each takes the case tensors and returns (out, entropy or None)

def fused(stats):
    def run(c):
        r = attention(c["q"], c["k"], c["v"], stats=stats, grid=c["grid"], labels=c["labels"])
        return r.out, r.entropy
    return run


def sdpa(c):
    return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None


def materialising(c):
    """What hook-based tools do: the full (N, N) probabilities, then entropy from them."""
    q, k, v = c["q"], c["k"], c["v"]
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    return torch.matmul(p, v), entropy


def sdpa_backend(name):
    """SDPA pinned to one backend ("FLASH_ATTENTION" or "EFFICIENT_ATTENTION") on the GPU."""
    def run(c):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, name)):
            return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None
    return run


IMPLEMENTATIONS = {
    "fused": fused(()),
    "fused+entropy": fused(("entropy",)),
    "fused+all stats": fused(ALL_STATS),
    "sdpa": sdpa,
    "materialising": materialising,
}
CUDA_IMPLEMENTATIONS = {
    "fused": fused(()),
    "fused+entropy": fused(("entropy",)),
    "fused+all stats": fused(ALL_STATS),
    "sdpa-flash": sdpa_backend("FLASH_ATTENTION"),
    "sdpa-efficient": sdpa_backend("EFFICIENT_ATTENTION"),
    "materialising": materialising,
}


# Optional GPU baselines: name -> (module, function). Both libraries take (B, N, H, D) tensors
# where diffcirc and SDPA take (B, H, N, D).
OPTIONAL_BASELINES = {
    "xformers": ("xformers.ops", "memory_efficient_attention"),
    "flash-attn": ("flash_attn", "flash_attn_func"),
}
BASELINES = ("sdpa", "sdpa-flash", "sdpa-efficient", "materialising", *OPTIONAL_BASELINES)


def skip_reason(name: str, error: BaseException) -> str | None:
    """Why implementation ``name`` is skipped for a case after raising ``error``, or None when the
    error must propagate.

    A wrong result (IncorrectImplementation) is never skipped: it is refused. Running out of memory
    skips any implementation. The optional libraries (xformers, flash-attn) refuse dtypes, head
    dims and shapes with whatever exception they like (ValueError, TypeError, AssertionError, ...),
    so any Exception skips them; torch's own baselines are skipped only for a RuntimeError
    (NotImplementedError included); anything else, and any failure of diffcirc's own kernels, is a bug.
    """
    if isinstance(error, IncorrectImplementation) or not isinstance(error, Exception):
        return None
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    if name in OPTIONAL_BASELINES or (name in BASELINES and isinstance(error, RuntimeError)):
        return f"failed: {(str(error) or type(error).__name__).splitlines()[0][:100]}"
    return None


def _bnhd(c):
    """q, k, v of a case as contiguous (B, N, H, D), made once per case and kept in it, so that the
    transposition is not timed (a caller of these libraries holds that layout already)."""
    if "bnhd" not in c:
        c["bnhd"] = tuple(c[t].transpose(1, 2).contiguous() for t in ("q", "k", "v"))
    return c["bnhd"]


def bnhd_baseline(kernel):
    """An implementation from kernel(q, k, v) -> out, all (B, N, H, D) with the default scale
    D^-0.5; its output is handed back as a (B, H, N, D) view."""
    def run(c):
        q, k, v = _bnhd(c)
        return kernel(q, k, v).transpose(1, 2), None
    return run


def _missing_reason(module: str, error: ImportError) -> str:
    # A ModuleNotFoundError for the package itself means absent; anything else (a missing
    # dependency, an ABI mismatch) is a broken install and says why.
    name = getattr(error, "name", None) or ""
    if isinstance(error, ModuleNotFoundError) and (module == name or module.startswith(name + ".")):
        return "not installed"
    return f"import failed: {(str(error) or type(error).__name__).splitlines()[0]}"


def optional_baselines(device: str) -> tuple:
    """(found, status): found maps name -> implementation for each optional baseline importable
    on this device (GPU libraries: cuda only); status maps every optional name to "available
    (version)", "not installed", "import failed: ..." or "cuda only"."""
    found, status = {}, {}
    for name, (module, attr) in OPTIONAL_BASELINES.items():
        if device != "cuda":
            status[name] = "cuda only"
            continue
        try:
            kernel = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            status[name] = _missing_reason(module, e)
            continue
        except AttributeError:
            status[name] = f"import failed: {module} has no {attr}"
            continue
        version = getattr(importlib.import_module(module.split(".")[0]), "__version__", "unknown version")
        found[name] = bnhd_baseline(kernel)
        status[name] = f"available ({version})"
    return found, status


def op_implementations(device: str) -> tuple:
    """(known, missing, status) for the op benchmark on device: known maps name -> implementation
    (IMPLEMENTATIONS on cpu; CUDA_IMPLEMENTATIONS plus the optional baselines that import on cuda),
    missing maps each optional baseline not in known to why, status is optional_baselines' status."""
    found, status = optional_baselines(device)
    known = {**CUDA_IMPLEMENTATIONS, **found} if device == "cuda" else dict(IMPLEMENTATIONS)
    missing = {name: why for name, why in status.items() if name not in found}
    return known, missing, status


def make_case(b, h, n, d, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
    side = int(n**0.5)
    grid = ((side, n // side), (side, n // side)) if side * (n // side) == n else ((1, n), (1, n))
    labels = tuple(torch.randint(0, 8, (b, n), generator=g, device=device) for _ in range(2))
    return {"q": q, "k": k, "v": v, "grid": grid, "labels": labels}


def reference(case):
    """The float64 reference (out and entropy) on (b=0, h=0) of a case."""
    sl = lambda t: t[:1, :1]  # noqa: E731
    return reference_attention(sl(case["q"]), sl(case["k"]), sl(case["v"]), stats=("entropy",))


def check(name, fn, case, dtype, ref=None) -> float:
    """Max abs error of out (and entropy) on (b=0, h=0) against the float64 reference (computed here
    unless given); raises IncorrectImplementation past the dtype's tolerance. Calls fn exactly once."""
    out, entropy = fn(case)
    sl = lambda t: t[:1, :1]  # noqa: E731
    ref = reference(case) if ref is None else ref
    err = (sl(out).double() - ref.out).abs().max().item()
    if entropy is not None:
        err = max(err, (sl(entropy).double() - ref.entropy).abs().max().item())
    tol = TOLERANCES[dtype]
    if not err <= tol:
        raise IncorrectImplementation(f"{name}: max error {err:.3g} against the float64 reference exceeds {tol}")
    return err


# ---------------------------------------------------------------------------------------------
# timing and memory

def time_call(fn, arg, repeats: int, warmup: int = 1) -> list:
    """Seconds per call (wall clock), after warmup untimed calls."""
    for _ in range(warmup):
        fn(arg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return times


def cuda_time_call(fn, arg, repeats: int, warmup: int = 1) -> list:
    """Seconds per call, from CUDA events around each call on the current stream, after warmup
    untimed calls (and lazy initialisation)."""
    for _ in range(warmup):
        fn(arg)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return times


def summarize(times) -> dict:
    """Median and spread, in milliseconds, of per-call times given in seconds."""
    return {"ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap():
    # Returns freed heap pages to the OS so that the next call's RSS growth is its own.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_memory(fn, *args) -> int:
    """Peak resident-memory growth during one call (bytes), sampled every 0.5 ms."""
    _trim_heap()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn(*args)
        peak = max(peak, _rss_bytes())
    finally:
        done.set()
        t.join()
    del result
    return max(0, peak - base)


def cuda_peak_extra_memory(fn, *args) -> int:
    """Peak bytes allocated on the GPU during one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return max(0, peak)


def measurers(device) -> tuple:
    """(time_call, peak extra memory) for a device ("cpu", "cuda" or a torch.device): the CUDA
    event timer and allocator peak on cuda, the wall clock and resident-memory peak elsewhere."""
    if getattr(device, "type", device) == "cuda":
        return cuda_time_call, cuda_peak_extra_memory
    return time_call, peak_extra_memory


# ---------------------------------------------------------------------------------------------
# machine info

def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    ext = extension.load()
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": ext.cpu_isa() if ext else "reference (no extension)",
        "blas": ext.blas_backend() if ext else None,
        "commit": commit,
    }


def cuda_machine_info() -> dict:
    info = machine_info()
    ext = extension.load()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                cuda_archs_compiled=ext.cuda_archs() if ext else [])
    return info


def full_machine_info(device: str = "cpu") -> dict:
    """machine_info plus the device, the CUDA version torch was built with and the GPU (on cuda)."""
    info = cuda_machine_info() if device == "cuda" else {**machine_info(), "cuda": torch.version.cuda, "gpu": None}
    info["device"] = device
    return info


# ---------------------------------------------------------------------------------------------
# output, comparison, scaling

KEY_FIELDS = ("case", "dtype", "b", "h", "n", "d", "conditions", "images", "max_batch", "implementation")
CSV_FIELDS = ("case", "implementation", "dtype", "b", "h", "n", "d", "conditions", "images", "max_batch", "ms",
              "ms_min", "ms_max", "gflops", "vs_sdpa", "peak_extra_bytes", "max_abs_err", "skipped")


def write_json(path, meta: dict, rows: list, **extra) -> str:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows, **extra}, f, indent=2)
    return path


def write_csv(path, rows: list) -> str:
    """One line per result; the columns of CSV_FIELDS first, then any others in first-seen order."""
    fields = [k for k in CSV_FIELDS if any(k in r for r in rows)]
    fields += [k for r in rows for k in r if k not in fields and not isinstance(r[k], (dict, list))]
    fields = list(dict.fromkeys(fields))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def case_key(row: dict) -> tuple:
    return tuple((k, row[k]) for k in KEY_FIELDS if k in row)


def compare(old_rows: list, new_rows: list, threshold_pct: float = 10.0) -> list:
    """Per case present in both runs (and timed in both): old and new median ms, change in % and
    whether it slowed down by more than threshold_pct."""
    old = {case_key(r): r for r in old_rows if r.get("ms") is not None}
    out = []
    for r in new_rows:
        o = old.get(case_key(r))
        if o is None or r.get("ms") is None:
            continue
        change = (r["ms"] - o["ms"]) / o["ms"] * 100.0
        out.append({"key": dict(case_key(r)), "old_ms": o["ms"], "new_ms": r["ms"], "change_pct": change,
                    "regressed": change > threshold_pct})
    return out


def fit_exponent(ns, values) -> float | None:
    """Least-squares slope of log(value) against log(n): value ~ n^slope. Non-positive values are
    left out; None with fewer than two usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx
