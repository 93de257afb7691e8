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
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcirc.bench.harness import (  # noqa: E402
    CUDA_IMPLEMENTATIONS, DTYPES, IMPLEMENTATIONS, OPTIONAL_BASELINES, full_machine_info, op_implementations)
from diffcirc.bench.op import HEADER, run_op  # noqa: E402
from diffcirc.cli._checks import device, positive  # noqa: E402
from diffcirc.ops import extension  # noqa: E402

CPU_DEFAULTS = {"n": [1024, 4096], "d": [40, 64, 160], "dtype": ["f32", "bf16"], "impl": list(IMPLEMENTATIONS)}
CUDA_DEFAULTS = {"n": [1024, 4096, 16384], "d": [40, 64, 128, 160], "dtype": ["f16", "bf16"]}  # impl: all that import


def run(args, known: dict, unavailable: dict | None = None) -> int:
    """The table for args.device (cpu: fused vs SDPA vs the materialising path; cuda: also SDPA's
    flash and memory-efficient backends, xformers and flash-attn where installed), through
    diffcirc.bench.op.run_op: each implementation checked before it is timed, GFLOP/s, the ratio
    to the baseline and peak memory; then the statistics' cost per case. known: name ->
    implementation, args.impl chosen from it; unavailable: name -> why, listed as skipped rows."""
    print(HEADER)
    print("-" * len(HEADER))
    impls = {name: known[name] for name in args.impl}
    rows = run_op([(args.b, args.h, n, d) for n in args.n for d in args.d], args.dtype, impls, device=args.device,
                  repeats=args.repeats, unavailable=unavailable, log=print)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["dtype"], r["n"], r["d"]), {})[r["implementation"]] = r
    for (dt, n, d), results in by_case.items():
        ms = {name: r["ms"] for name, r in results.items() if "ms" in r}
        if "materialising" in ms and "fused+entropy" in ms:
            print(f"{dt:5} {n:>6} {d:>4} fused+entropy is {ms['materialising'] / ms['fused+entropy']:.1f}x faster "
                  "than the materialising path")
        if "fused" in ms and "fused+all stats" in ms:
            print(f"{dt:5} {n:>6} {d:>4} all statistics cost {ms['fused+all stats'] / ms['fused']:.2f}x the plain "
                  "fused kernel")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": full_machine_info(args.device), "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", type=device, choices=["cpu", "cuda"],
                   help="cuda needs a CUDA GPU and a CUDA build of torch")
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
    cuda = args.device == "cuda"
    known, missing, status = op_implementations(args.device)
    # on cuda the optional baselines that did not import are listed in every case, unless --impl picked others
    unavailable = missing if cuda and args.impl is None else {}
    defaults = {**CUDA_DEFAULTS, "impl": list(known)} if cuda else CPU_DEFAULTS
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
    ext = extension.load()
    if cuda:
        print("optional baselines: " + "; ".join(f"{name}: {why}" for name, why in status.items()))
        if ext is None or not ext.cuda_archs():
            print("warning: diffcirc._C has no CUDA kernels; 'fused' rows time the float64 reference", file=sys.stderr)
    elif ext is None:
        print("warning: diffcirc._C is not built; 'fused' rows time the float64 reference", file=sys.stderr)
    return run(args, known, unavailable)


if __name__ == "__main__":
    raise SystemExit(main())
