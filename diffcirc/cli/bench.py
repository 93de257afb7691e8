"""``diffcirc bench``: the benchmarks of ``benchmarks/`` with JSON, CSV, plots and regression checks.

    diffcirc bench op [--device cpu|cuda] [--dtype f32 bf16] [--shapes 2x8x1024x64 4096x64] [--repeats 5]
                      [--out DIR] [--compare OLD.json] [--threshold 10] [--quick] [--scaling]
    diffcirc bench unet [--device cpu|cuda] [--repeats 5] [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench sweep [--device cpu|cuda] [--conditions 9 25] [--max-batch 8 40 200] [--images 8]
                         [--repeats 3] [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench compare NEW.json OLD.json [--threshold 10]

Every implementation is checked against the reference before it is timed; a wrong one is refused
(exit 3). With --compare, a case slower than OLD by more than --threshold percent exits 1. On cuda
the op benchmark adds xformers and flash-attn where they import; where not, it says why."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._checks import device as torch_device, non_negative, positive

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


def shape_arg(text: str) -> str:
    """type= for --shapes: the form parse_shape takes, every size > 0 (a 0 or a typo would fail, or
    divide by zero, only once the benchmark runs)."""
    try:
        sizes = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2, 4) or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected BxHxNxD, NxD or N of integers > 0, got {text!r}")
    return text


# Every count below is range-checked by its type=: a 0 or a negative is a usage error (exit 2) now,
# not a ZeroDivisionError, StatisticsError or torch RuntimeError after the first measurements.
def _common(p, default_out):
    # type=torch_device refuses cuda on a machine without it at parse time (exit 2)
    p.add_argument("--device", default="cpu", type=torch_device, choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=positive(int), default=None,
                   help="timed calls per case after one warm-up (median)")
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--out", default=default_out, help="directory for results.json, results.csv (and plots)")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case; exit 1 on a regression")
    p.add_argument("--threshold", type=non_negative(float), default=10.0,
                   help="regression threshold in %% (default 10)")
    p.add_argument("--quick", action="store_true", help="small cases, few repeats")
    p.add_argument("--no-plots", action="store_true", help="no PNG figures")


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark the fused op or a UNet; JSON, CSV, plots, --compare",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench_command", metavar="{op,unet,sweep,compare}")
    op = sub.add_parser("op", help="fused attention vs SDPA vs the materialising path (and on cuda xformers, "
                                   "flash-attn where installed; benchmarks/bench_attention.py)")
    _common(op, os.path.join("runs", "bench", "op"))
    op.add_argument("--dtype", nargs="+", help="f32 bf16 f16 (default: f32 bf16 on cpu, f16 bf16 on cuda)")
    op.add_argument("--shapes", type=shape_arg, nargs="+", help="BxHxNxD, NxD or N (default: N in 1024 4096, D in 40 64 160)")
    op.add_argument("--b", type=positive(int), default=2)
    op.add_argument("--h", type=positive(int), default=8)
    op.add_argument("--impl", nargs="+", help="implementations (default: all for the device)")
    op.add_argument("--scaling", action="store_true",
                    help="N = 256 .. 16384 (--quick: .. 2048), B=1 H=2 D=64 unless --shapes; fit time and memory ~ N^k")
    op.add_argument("--mem-budget-gib", type=positive(float), default=4.0,
                    help="skip the materialising path where it would need more (cpu; default 4)")
    op.set_defaults(func=run_op_command)
    unet = sub.add_parser("unet", help="diffusers forward passes per attention processor (benchmarks/bench_unet.py)")
    _common(unet, os.path.join("runs", "bench", "unet"))
    unet.set_defaults(func=run_unet_command)
    sweep = sub.add_parser("sweep", help="the single-head ablation sweep of a tiny UNet: batched vs one condition "
                                         "at a time (benchmarks/bench_unet.py)")
    _common(sweep, os.path.join("runs", "bench", "sweep"))
    sweep.add_argument("--conditions", type=positive(int), nargs="+",
                       help="numbers of conditions: the clean run + the first single-head ablations "
                            "(default: all 25, --quick 9)")
    sweep.add_argument("--max-batch", type=positive(int), nargs="+",
                       help="batch elements per batched pass (default: images x 1, 5 and all conditions)")
    sweep.add_argument("--images", type=positive(int), help="images per condition (default 8, --quick 1)")
    sweep.set_defaults(func=run_sweep_command)
    cmp = sub.add_parser("compare", help="compare two results.json files")
    cmp.add_argument("new")
    cmp.add_argument("old")
    cmp.add_argument("--threshold", type=non_negative(float), default=10.0)
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


def _meta(device: str, kind: str, args: dict) -> dict:
    from diffcirc.bench import harness

    return {**harness.full_machine_info(device), "kind": kind,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in args.items() if k != "func"}}


def _title(meta: dict) -> str:
    """A plot title naming the machine: CPU or GPU, torch, ISA."""
    return f"{meta['cpu'] if meta['device'] == 'cpu' else meta['gpu']} · torch {meta['torch']} · {meta['isa']}"


def _finish(args, meta, rows, plot, **extra) -> int:
    """Writes results.json, results.csv and (unless --no-plots) plot(rows, out, title)'s PNGs into
    --out, then compares with --compare; returns the exit status."""
    paths = _write(args.out, meta, rows, **extra)
    if not args.no_plots:
        paths += plot(rows, args.out, title=_title(meta))
    print("wrote " + " ".join(paths))
    return compare_rows(rows, args.compare, args.threshold) if args.compare else 0


def _op_shapes(args) -> list:
    """(b, h, n, d) cases from --shapes, --scaling and --quick."""
    from diffcirc.bench import op

    ns = op.SCALING_QUICK_NS if args.quick else op.SCALING_NS
    if args.shapes:
        shapes = [parse_shape(s, args.b, args.h) for s in args.shapes]
        return [(b, h, n, d) for b, h, _, d in shapes[:1] for n in ns] if args.scaling else shapes
    if args.scaling:
        return [(1, 2, n, 64) for n in ns]
    if args.quick:
        return [(args.b, args.h, 1024, 64)]
    return [(args.b, args.h, n, d) for n in (1024, 4096) for d in (40, 64, 160)]


def run_op_command(args) -> int:
    import torch

    from diffcirc.bench import harness, op
    from diffcirc.bench.plots import write_plots

    known, missing, status = harness.op_implementations(args.device)
    names = args.impl or list(known)
    unknown = [n for n in names if n not in known]
    dtypes = args.dtype or (["f16", "bf16"] if args.device == "cuda" else (["f32"] if args.scaling else ["f32", "bf16"]))
    bad_dtypes = [d for d in dtypes if d not in harness.DTYPES]
    if unknown or bad_dtypes:
        why = "".join(f"; {n}: {missing[n]}" for n in unknown if n in missing)
        print(f"error: unknown implementation(s) {unknown} (choose from {list(known)}{why}) or dtype(s) {bad_dtypes} "
              f"(choose from {list(harness.DTYPES)})", file=sys.stderr)
        return 2
    # on cuda the optional baselines that did not import are listed in every case, unless --impl picked others
    unavailable = missing if args.device == "cuda" and not args.impl else {}
    print("optional baselines: " + "; ".join(f"{n}: {why}" for n, why in status.items()))
    repeats = args.repeats or (2 if args.quick or args.scaling else 5)
    torch.set_num_threads(args.threads)
    budget = args.mem_budget_gib * 2**30 if args.device == "cpu" else None
    print(op.HEADER)
    print("-" * len(op.HEADER))
    try:
        rows = op.run_op(_op_shapes(args), dtypes, {n: known[n] for n in names}, args.device, repeats, budget,
                         unavailable)
    except harness.IncorrectImplementation as e:
        print(f"error: refused (not timed): {e}", file=sys.stderr)
        return EXIT_REFUSED
    meta = {**_meta(args.device, "op", vars(args)), "optional_baselines": status}
    extra = {}
    if args.scaling:
        extra["fits"] = op.scaling_fits(rows)
        print("\nscaling (least squares on log-log):")
        print(op.format_fits(extra["fits"]))
    return _finish(args, meta, rows, write_plots, **extra)


def _unet_argv(args, *extra) -> list:
    """bench_unet's own options from the common ones."""
    argv = ["--device", args.device, "--threads", str(args.threads), *extra]
    return argv + (["--quick"] if args.quick else [])


def run_unet_command(args) -> int:
    from diffcirc.bench.plots import write_unet_plots
    from diffcirc.bench.unet import run_unet

    try:
        rows, uargs = run_unet(_unet_argv(args, *(["--repeats", str(args.repeats)] if args.repeats else [])))
    except AssertionError as e:
        print(f"error: refused (not timed): {e}", file=sys.stderr)
        return EXIT_REFUSED
    return _finish(args, _meta(args.device, "unet", vars(uargs)), rows, write_unet_plots)


def run_sweep_command(args) -> int:
    from diffcirc.bench.plots import write_sweep_plots
    from diffcirc.bench.unet import run_sweep

    extra = ["--sweep-repeats", str(args.repeats)] if args.repeats else []
    extra += ["--sweep-images", str(args.images)] if args.images else []
    extra += ["--conditions", *map(str, args.conditions)] if args.conditions else []
    extra += ["--max-batch", *map(str, args.max_batch)] if args.max_batch else []
    try:
        rows, uargs = run_sweep(_unet_argv(args, *extra))
    except AssertionError as e:
        print(f"error: refused (not timed): {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _finish(args, _meta(args.device, "sweep", vars(uargs)), rows, write_sweep_plots)
