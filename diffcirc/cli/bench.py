"""``diffcirc bench``: the benchmarks of ``benchmarks/`` with JSON, CSV, plots and regression checks.

    diffcirc bench op [--device cpu|cuda] [--dtype f32 bf16] [--shapes 2x8x1024x64 4096x64] [--repeats 5]
                      [--out DIR] [--compare OLD.json] [--threshold 10] [--quick] [--scaling]
    diffcirc bench unet [--device cpu|cuda] [--repeats 5] [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench compare NEW.json OLD.json [--threshold 10]

Every implementation is checked against the reference before it is timed; a wrong one is refused
(exit 3). With --compare, a case slower than OLD by more than --threshold percent exits 1."""

from __future__ import annotations

import json
import os
import sys
import time

EXIT_REGRESSION = 1
EXIT_REFUSED = 3


def parse_shape(text: str, b: int, h: int) -> tuple:
    """'BxHxNxD' or 'NxD' (B and H from --b/--h) or 'N' (D = 64) -> (b, h, n, d)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 4:
        return tuple(parts)
    if len(parts) == 2:
        return (b, h, *parts)
    if len(parts) == 1:
        return (b, h, parts[0], 64)
    raise ValueError(f"shape {text!r}: expected BxHxNxD, NxD or N")


def _common(p, default_out):
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=default_out, help="directory for results.json, results.csv (and plots)")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case; exit 1 on a regression")
    p.add_argument("--threshold", type=float, default=10.0, help="regression threshold in %% (default 10)")
    p.add_argument("--quick", action="store_true", help="small cases, few repeats")


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark the fused op or a UNet; JSON, CSV, plots, --compare",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench_command", metavar="{op,unet,compare}")
    op = sub.add_parser("op", help="fused attention vs SDPA vs the materialising path (benchmarks/bench_attention.py)")
    _common(op, os.path.join("runs", "bench", "op"))
    op.add_argument("--dtype", nargs="+", help="f32 bf16 f16 (default: f32 bf16 on cpu, f16 bf16 on cuda)")
    op.add_argument("--shapes", nargs="+", help="BxHxNxD, NxD or N (default: N in 1024 4096, D in 40 64 160)")
    op.add_argument("--b", type=int, default=2)
    op.add_argument("--h", type=int, default=8)
    op.add_argument("--impl", nargs="+", help="implementations (default: all for the device)")
    op.add_argument("--scaling", action="store_true",
                    help="N = 256 .. 16384 (--quick: .. 2048), B=1 H=2 D=64 unless --shapes; fit time and memory ~ N^k")
    op.add_argument("--mem-budget-gib", type=float, default=4.0,
                    help="skip the materialising path where it would need more (cpu; default 4)")
    op.add_argument("--no-plots", action="store_true")
    op.set_defaults(func=run_op_command)
    unet = sub.add_parser("unet", help="diffusers forward passes and the ablation sweep (benchmarks/bench_unet.py)")
    _common(unet, os.path.join("runs", "bench", "unet"))
    unet.add_argument("--no-sweep", action="store_true")
    unet.set_defaults(func=run_unet_command)
    cmp = sub.add_parser("compare", help="compare two results.json files")
    cmp.add_argument("new")
    cmp.add_argument("old")
    cmp.add_argument("--threshold", type=float, default=10.0)
    cmp.set_defaults(func=lambda a: compare_files(a.new, a.old, a.threshold))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def compare_files(new_path: str, old_path: str, threshold: float, out=None) -> int:
    """Prints the per-case change of new vs old; 1 when any case slowed by more than threshold %."""
    with open(new_path) as f:
        new = json.load(f)["results"]
    return compare_rows(new, old_path, threshold, out)


def compare_rows(new_rows: list, old_path: str, threshold: float, out=None) -> int:
    from diffcirc.bench.harness import compare

    out = out or sys.stdout
    with open(old_path) as f:
        old = json.load(f)["results"]
    changes = compare(old, new_rows, threshold)
    if not changes:
        print(f"compare: no case in common with {old_path}", file=sys.stderr)
        return 2
    print(f"\nchange vs {old_path} (threshold +{threshold:g}%):", file=out)
    for c in changes:
        key = " ".join(f"{k}={v}" for k, v in c["key"].items())
        flag = "  REGRESSION" if c["regressed"] else ""
        print(f"  {key:60} {c['old_ms']:>9.3f} -> {c['new_ms']:>9.3f} ms {c['change_pct']:>+7.1f}%{flag}", file=out)
    bad = [c for c in changes if c["regressed"]]
    print(f"{len(bad)} of {len(changes)} cases regressed past {threshold:g}%", file=out)
    return EXIT_REGRESSION if bad else 0


def _write(out_dir, meta, rows, **extra):
    from diffcirc.bench.harness import write_csv, write_json

    os.makedirs(out_dir, exist_ok=True)
    paths = [write_json(os.path.join(out_dir, "results.json"), meta, rows, **extra),
             write_csv(os.path.join(out_dir, "results.csv"), rows)]
    return paths


def run_op_command(args) -> int:
    import torch

    from diffcirc.bench import harness, op

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    known = harness.CUDA_IMPLEMENTATIONS if args.device == "cuda" else harness.IMPLEMENTATIONS
    names = args.impl or list(known)
    unknown = [n for n in names if n not in known]
    dtypes = args.dtype or (["f16", "bf16"] if args.device == "cuda" else (["f32"] if args.scaling else ["f32", "bf16"]))
    bad_dtypes = [d for d in dtypes if d not in harness.DTYPES]
    if unknown or bad_dtypes:
        print(f"error: unknown implementation(s) {unknown} (choose from {list(known)}) or dtype(s) {bad_dtypes} "
              f"(choose from {list(harness.DTYPES)})", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = [parse_shape(s, args.b, args.h) for s in args.shapes]
        if args.scaling:
            shapes = [(b, h, n, d) for b, h, _, d in shapes[:1] for n in (op.SCALING_QUICK_NS if args.quick else op.SCALING_NS)]
    elif args.scaling:
        shapes = [(1, 2, n, 64) for n in (op.SCALING_QUICK_NS if args.quick else op.SCALING_NS)]
    elif args.quick:
        shapes = [(args.b, args.h, 1024, 64)]
    else:
        shapes = [(args.b, args.h, n, d) for n in (1024, 4096) for d in (40, 64, 160)]
    repeats = args.repeats or (2 if args.quick or args.scaling else 5)
    torch.set_num_threads(args.threads)
    budget = args.mem_budget_gib * 2**30 if args.device == "cpu" else None
    print(op.HEADER)
    print("-" * len(op.HEADER))
    try:
        rows = op.run_op(shapes, dtypes, {n: known[n] for n in names}, args.device, repeats, budget)
    except harness.IncorrectImplementation as e:
        print(f"error: refused (not timed): {e}", file=sys.stderr)
        return EXIT_REFUSED
    meta = {**harness.full_machine_info(args.device), "kind": "op", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    extra = {}
    if args.scaling:
        fits = op.scaling_fits(rows)
        extra["fits"] = fits
        print("\nscaling (least squares on log-log):")
        print(op.format_fits(fits))
    paths = _write(args.out, meta, rows, **extra)
    if not args.no_plots:
        from diffcirc.bench.plots import write_plots

        paths += write_plots(rows, args.out, title=f"{meta['cpu'] if args.device == 'cpu' else meta['gpu']} · "
                                                    f"torch {meta['torch']} · {meta['isa']}")
    print("wrote " + " ".join(paths))
    return compare_rows(rows, args.compare, args.threshold) if args.compare else 0


def run_unet_command(args) -> int:
    from diffcirc.bench import harness
    from diffcirc.bench.unet import run_unet

    argv = ["--device", args.device, "--threads", str(args.threads)]
    argv += ["--repeats", str(args.repeats)] if args.repeats else []
    argv += ["--quick"] if args.quick else []
    argv += ["--no-sweep"] if args.no_sweep else []
    try:
        rows, sweep, uargs = run_unet(argv)
    except AssertionError as e:
        print(f"error: refused (not timed): {e}", file=sys.stderr)
        return EXIT_REFUSED
    meta = {**harness.full_machine_info(args.device), "kind": "unet",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(uargs)}
    print("wrote " + " ".join(_write(args.out, meta, rows, sweep=sweep)))
    return compare_rows(rows, args.compare, args.threshold) if args.compare else 0
