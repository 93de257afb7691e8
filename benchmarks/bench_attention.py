"""Op-level benchmark: diffcirc's fused attention vs PyTorch SDPA vs the materialising path.

For every case (batch, heads, N, head dim, dtype) and implementation it checks the output against
the float64 reference first, then times it (median of repeats after a warm-up) and measures the
peak extra memory of one call. Writes a table to stdout and, with --json, the figures plus the
machine, torch version, CPU ISA path and commit.

    python benchmarks/bench_attention.py                       # the full CPU table
    python benchmarks/bench_attention.py --quick               # one small case per dtype
    python benchmarks/bench_attention.py --n 4096 --d 64 --dtype f32 --json out.json
    python benchmarks/bench_attention.py --device cuda          # GPU: fused vs SDPA flash/efficient
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcirc.ops import attention, extension, reference_attention  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ALL_STATS = ("lse", "entropy", "distance", "label_mass")


# ---------------------------------------------------------------------------------------------
# implementations: each takes the case tensors and returns (out, entropy or None)

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


IMPLEMENTATIONS = {
    "fused": fused(()),
    "fused+entropy": fused(("entropy",)),
    "fused+all stats": fused(ALL_STATS),
    "sdpa": sdpa,
    "materialising": materialising,
}


def sdpa_backend(name):
    """SDPA pinned to one backend ("FLASH_ATTENTION" or "EFFICIENT_ATTENTION") on the GPU."""
    def run(c):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, name)):
            return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None
    return run


CUDA_IMPLEMENTATIONS = {
    "fused": fused(()),
    "fused+entropy": fused(("entropy",)),
    "fused+all stats": fused(ALL_STATS),
    "sdpa-flash": sdpa_backend("FLASH_ATTENTION"),
    "sdpa-efficient": sdpa_backend("EFFICIENT_ATTENTION"),
    "materialising": materialising,
}
BASELINES = ("sdpa", "sdpa-flash", "sdpa-efficient", "materialising")
CPU_DEFAULTS = {"n": [1024, 4096], "d": [40, 64, 160], "dtype": ["f32", "bf16"], "impl": list(IMPLEMENTATIONS)}
CUDA_DEFAULTS = {"n": [1024, 4096, 16384], "d": [40, 64, 128, 160], "dtype": ["f16", "bf16"],
                 "impl": list(CUDA_IMPLEMENTATIONS)}


# ---------------------------------------------------------------------------------------------
# measurement

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


def time_call(fn, arg, repeats: int) -> list:
    fn(arg)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return times


def make_case(b, h, n, d, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
    side = int(n**0.5)
    grid = ((side, n // side), (side, n // side)) if side * (n // side) == n else ((1, n), (1, n))
    labels = tuple(torch.randint(0, 8, (b, n), generator=g, device=device) for _ in range(2))
    return {"q": q, "k": k, "v": v, "grid": grid, "labels": labels}


def check(name, fn, case, dtype) -> float:
    """Max abs error of out (and entropy) on (b=0, h=0) against the float64 reference."""
    out, entropy = fn(case)
    sl = lambda t: t[:1, :1]  # noqa: E731
    ref = reference_attention(sl(case["q"]), sl(case["k"]), sl(case["v"]), stats=("entropy",))
    err = (sl(out).double() - ref.out).abs().max().item()
    if entropy is not None:
        err = max(err, (sl(entropy).double() - ref.entropy).abs().max().item())
    tol = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    if not err <= tol:
        raise AssertionError(f"{name}: max error {err:.3g} against the float64 reference exceeds {tol}")
    return err


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


# ---------------------------------------------------------------------------------------------
# GPU

def cuda_time_call(fn, arg, repeats: int) -> list:
    """Seconds per call, from CUDA events around each call on the current stream."""
    fn(arg)  # warm-up (and lazy initialisation)
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


def cuda_machine_info() -> dict:
    info = machine_info()
    ext = extension.load()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                cuda_archs_compiled=ext.cuda_archs() if ext else [])
    return info


def run_cuda(args) -> int:
    """The GPU table: fused (with and without statistics) vs SDPA's flash and memory-efficient
    backends vs the materialising path, with TFLOP/s, speed ratios and peak memory."""
    device = torch.device("cuda")
    ext = extension.load()
    if ext is None or not ext.cuda_archs():
        print("warning: diffcirc._C has no CUDA kernels; 'fused' rows time the float64 reference", file=sys.stderr)
    rows = []
    header = (f"{'dtype':5} {'N':>6} {'D':>4} {'implementation':16} {'ms':>9} {'TFLOP/s':>8} {'vs flash':>8} "
              f"{'peak MiB':>9} {'max err':>8}")
    print(header)
    print("-" * len(header))
    for dt, n, d in itertools.product(args.dtype, args.n, args.d):
        case = make_case(args.b, args.h, n, d, DTYPES[dt], device=device)
        flops = 4 * args.b * args.h * n * n * d
        results = {}
        for name in args.impl:
            fn = CUDA_IMPLEMENTATIONS[name]
            try:
                err = check(name, fn, case, DTYPES[dt])
                times = cuda_time_call(fn, case, args.repeats)
                mem = cuda_peak_extra_memory(fn, case)
            except (RuntimeError, AssertionError) as e:  # a baseline may not support a case, or run out of memory
                if name not in BASELINES:
                    raise
                torch.cuda.empty_cache()
                reason = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else str(e).splitlines()[0]
                print(f"{dt:5} {n:>6} {d:>4} {name:16} n/a: {reason[:80]}")
                rows.append({"dtype": dt, "n": n, "d": d, "b": args.b, "h": args.h, "implementation": name,
                             "error": reason})
                continue
            results[name] = {"ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3,
                             "ms_max": max(times) * 1e3, "peak_extra_bytes": mem, "max_abs_err": err}
        base = (results.get("sdpa-flash") or results.get("sdpa-efficient") or {}).get("ms")
        for name, r in results.items():
            r.update(dtype=dt, n=n, d=d, b=args.b, h=args.h, implementation=name,
                     tflops=flops / (r["ms"] * 1e-3) / 1e12, vs_flash=(r["ms"] / base) if base else None)
            rows.append(r)
            ratio = f"{r['vs_flash']:.2f}x" if r["vs_flash"] else "-"
            print(f"{dt:5} {n:>6} {d:>4} {name:16} {r['ms']:>9.3f} {r['tflops']:>8.1f} {ratio:>8} "
                  f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")
        if "materialising" in results and "fused+entropy" in results:
            speedup = results["materialising"]["ms"] / results["fused+entropy"]["ms"]
            print(f"{'':17}fused+entropy is {speedup:.1f}x faster than the materialising path")
        if "fused" in results and "fused+all stats" in results:
            cost = results["fused+all stats"]["ms"] / results["fused"]["ms"]
            print(f"{'':17}all statistics cost {cost:.2f}x the plain fused kernel")
        del case
        torch.cuda.empty_cache()
        sys.stdout.flush()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": cuda_machine_info(), "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--n", type=int, nargs="+", help="default: 1024 4096 (cpu), 1024 4096 16384 (cuda)")
    p.add_argument("--d", type=int, nargs="+", help="default: 40 64 160 (cpu), 40 64 128 160 (cuda)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: f32 bf16 (cpu), f16 bf16 (cuda)")
    p.add_argument("--impl", nargs="+", choices=list(dict.fromkeys([*IMPLEMENTATIONS, *CUDA_IMPLEMENTATIONS])),
                   help=f"default (cpu): {' '.join(IMPLEMENTATIONS)}; (cuda): {' '.join(CUDA_IMPLEMENTATIONS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="N=1024, D=64 only, 3 repeats")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = CUDA_IMPLEMENTATIONS if args.device == "cuda" else IMPLEMENTATIONS
    unknown = [name for name in args.impl if name not in known]
    if unknown:
        p.error(f"--impl {' '.join(unknown)} not available with --device {args.device}; choose from {list(known)}")
    if args.quick:
        args.n, args.d, args.repeats = [1024], [64], 3
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda needs a CUDA GPU and a CUDA build of torch")
        return run_cuda(args)
    if extension.load() is None:
        print("warning: diffcirc._C is not built; 'fused' rows time the float64 reference", file=sys.stderr)

    rows = []
    header = f"{'dtype':5} {'N':>6} {'D':>4} {'implementation':16} {'ms':>9} {'GFLOP/s':>8} {'vs sdpa':>8} {'peak MiB':>9} {'max err':>8}"
    print(header)
    print("-" * len(header))
    for dt, n, d in itertools.product(args.dtype, args.n, args.d):
        case = make_case(args.b, args.h, n, d, DTYPES[dt])
        flops = 4 * args.b * args.h * n * n * d
        results = {}
        for name in args.impl:
            fn = IMPLEMENTATIONS[name]
            err = check(name, fn, case, DTYPES[dt])
            times = time_call(fn, case, args.repeats)
            mem = peak_extra_memory(fn, case)
            results[name] = {"ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3,
                             "ms_max": max(times) * 1e3, "peak_extra_bytes": mem, "max_abs_err": err}
        base = results.get("sdpa", {}).get("ms")
        for name, r in results.items():
            r.update(dtype=dt, n=n, d=d, b=args.b, h=args.h, implementation=name,
                     gflops=flops / (r["ms"] * 1e-3) / 1e9, vs_sdpa=(r["ms"] / base) if base else None)
            rows.append(r)
            ratio = f"{r['vs_sdpa']:.2f}x" if r["vs_sdpa"] else "-"
            print(f"{dt:5} {n:>6} {d:>4} {name:16} {r['ms']:>9.2f} {r['gflops']:>8.1f} {ratio:>8} "
                  f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")
        if "materialising" in results and "fused+entropy" in results:
            speedup = results["materialising"]["ms"] / results["fused+entropy"]["ms"]
            print(f"{'':17}fused+entropy is {speedup:.1f}x faster than the materialising path")
        sys.stdout.flush()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": machine_info(), "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
