"""Op-level benchmark: diffcirc's fused attention vs PyTorch SDPA vs the materialising path.

For every case (batch, heads, N, head dim, dtype) and implementation it checks the output against
the float64 reference first, then times it (median of repeats after a warm-up) and measures the
peak extra memory of one call. Writes a table to stdout and, with --json, the figures plus the
machine, torch version, CPU ISA path and commit.

    python benchmarks/bench_attention.py                       # the full CPU table
    python benchmarks/bench_attention.py --quick               # one small case per dtype
    python benchmarks/bench_attention.py --n 4096 --d 64 --dtype f32 --json out.json
    python benchmarks/bench_attention.py --device cuda          # GPU: fused vs SDPA flash/efficient,
                                                                # xformers and flash-attn where installed
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcirc.bench.harness import (  # noqa: E402
    CUDA_IMPLEMENTATIONS, DTYPES, IMPLEMENTATIONS, OPTIONAL_BASELINES, check, cuda_machine_info,
    cuda_peak_extra_memory, cuda_time_call, machine_info, make_case, optional_baselines, skip_reason, summarize)
from diffcirc.bench.op import HEADER, run_op  # noqa: E402
from diffcirc.cli._checks import positive  # noqa: E402
from diffcirc.ops import extension  # noqa: E402

CPU_DEFAULTS = {"n": [1024, 4096], "d": [40, 64, 160], "dtype": ["f32", "bf16"], "impl": list(IMPLEMENTATIONS)}
CUDA_DEFAULTS = {"n": [1024, 4096, 16384], "d": [40, 64, 128, 160], "dtype": ["f16", "bf16"]}  # impl: all that import


# ---------------------------------------------------------------------------------------------
# GPU

def run_cuda(args, known: dict) -> int:
    """The GPU table: fused (with and without statistics) vs SDPA's flash and memory-efficient
    backends, xformers and flash-attn (where installed) and the materialising path, with TFLOP/s,
    speed ratios and peak memory. known: name -> implementation, args.impl chosen from it."""
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
            fn = known[name]
            try:
                err = check(name, fn, case, DTYPES[dt])
                times = cuda_time_call(fn, case, args.repeats)
                mem = cuda_peak_extra_memory(fn, case)
            except Exception as e:  # a baseline may not support a case, or run out of memory; a wrong one is refused
                reason = skip_reason(name, e)
                if reason is None:  # IncorrectImplementation included: never shown as merely n/a
                    raise
                torch.cuda.empty_cache()
                print(f"{dt:5} {n:>6} {d:>4} {name:16} skipped: {reason}")
                rows.append({"dtype": dt, "n": n, "d": d, "b": args.b, "h": args.h, "implementation": name,
                             "skipped": reason})
                continue
            results[name] = {**summarize(times), "peak_extra_bytes": mem, "max_abs_err": err}
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
    p.add_argument("--b", type=positive(int), default=2)
    p.add_argument("--h", type=positive(int), default=8)
    p.add_argument("--n", type=positive(int), nargs="+", help="default: 1024 4096 (cpu), 1024 4096 16384 (cuda)")
    p.add_argument("--d", type=positive(int), nargs="+", help="default: 40 64 160 (cpu), 40 64 128 160 (cuda)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: f32 bf16 (cpu), f16 bf16 (cuda)")
    p.add_argument("--impl", nargs="+",
                   choices=list(dict.fromkeys([*IMPLEMENTATIONS, *CUDA_IMPLEMENTATIONS, *OPTIONAL_BASELINES])),
                   help=f"default (cpu): {' '.join(IMPLEMENTATIONS)}; (cuda): {' '.join(CUDA_IMPLEMENTATIONS)} "
                        f"and those of {' '.join(OPTIONAL_BASELINES)} that import")
    p.add_argument("--repeats", type=positive(int), default=5)
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--quick", action="store_true", help="N=1024, D=64 only, 3 repeats")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    found, status = optional_baselines(args.device)
    known = {**CUDA_IMPLEMENTATIONS, **found} if args.device == "cuda" else IMPLEMENTATIONS
    defaults = {**CUDA_DEFAULTS, "impl": list(known)} if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [name for name in args.impl if name not in known]
    if unknown:
        why = "".join(f"; {name}: {status[name]}" for name in unknown if name in status)
        p.error(f"--impl {' '.join(unknown)} not available with --device {args.device}{why}; choose from {list(known)}")
    if args.quick:
        args.n, args.d, args.repeats = [1024], [64], 3
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda needs a CUDA GPU and a CUDA build of torch")
        print("optional baselines: " + "; ".join(f"{name}: {why}" for name, why in status.items()))
        return run_cuda(args, known)
    if extension.load() is None:
        print("warning: diffcirc._C is not built; 'fused' rows time the float64 reference", file=sys.stderr)

    print(HEADER)
    print("-" * len(HEADER))
    impls = {name: IMPLEMENTATIONS[name] for name in args.impl}
    rows = run_op([(args.b, args.h, n, d) for n in args.n for d in args.d], args.dtype, impls,
                  repeats=args.repeats, log=print)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["dtype"], r["n"], r["d"]), {})[r["implementation"]] = r
    for (dt, n, d), results in by_case.items():
        if "ms" in results.get("materialising", {}) and "ms" in results.get("fused+entropy", {}):
            speedup = results["materialising"]["ms"] / results["fused+entropy"]["ms"]
            print(f"{dt:5} {n:>6} {d:>4} fused+entropy is {speedup:.1f}x faster than the materialising path")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": machine_info(), "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
