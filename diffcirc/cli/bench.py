"""``diffcirc bench``: the benchmarks of diffcirc.bench with JSON, CSV, plots and regression checks.

    diffcirc bench op [--device cpu|cuda] [--dtype f32 bf16] [--shapes 2x8x1024x64 4096x64] [--impl ...]
                      [--repeats 5] [--out DIR] [--compare OLD.json] [--threshold 10] [--quick] [--scaling]
    diffcirc bench unet [--device cpu|cuda] [--latent 64] [--widths 320 640] [--impl ...] [--repeats 5]
                        [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench sweep [--device cpu|cuda] [--conditions 9 25] [--max-batch 8 40 200] [--images 8]
                         [--repeats 3] [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench joint [--device cpu|cuda] [--dtype bf16] [--heads 4] [--n-img 4096] [--n-txt 512] [--d 128]
                         [--impl ...] [--repeats 3] [--out DIR] [--compare OLD.json] [--quick]
    diffcirc bench sass [--extension PATH] [--kernels REGEX] [--out DIR]
    diffcirc bench compare NEW.json OLD.json [--threshold 10]

Every implementation is checked against the reference before it is timed; a wrong one is refused
(exit 3). With --compare, a case slower than OLD by more than --threshold percent exits 1. On cuda
the op benchmark adds xformers and flash-attn where they import; where not, it says why.

Each sub-command has one parser here, the only place its options are defined; the defaults are the
library's (diffcirc.bench.op and diffcirc.bench.configs). The heavy modules are imported when a
command runs, so `diffcirc --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from diffcirc.bench import configs, implementations, op
from diffcirc.bench.cases import DTYPES

from ._checks import device as torch_device, non_negative, positive

EXIT_REGRESSION = 1
EXIT_REFUSED = 3


def shape_arg(text: str) -> str:
    """type= for --shapes: the form op.parse_shape takes (BxHxNxD, NxD or N), every size > 0 (a 0
    or a typo would fail, or divide by zero, only once the benchmark runs)."""
    try:
        sizes = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2, 4) or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected BxHxNxD, NxD or N of integers > 0, got {text!r}")
    return text


# Every count below is range-checked by its type=: a 0 or a negative is a usage error (exit 2) now,
# not a ZeroDivisionError, StatisticsError or torch RuntimeError after the first measurements.
def _common(p, name: str, repeats_help: str):
    # type=torch_device refuses cuda on a machine without it at parse time (exit 2)
    p.add_argument("--device", default="cpu", type=torch_device, choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=positive(int), help=f"timed runs per case after the warm-up ({repeats_help})")
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--out", default=os.path.join("runs", "bench", name),
                   help="directory for results.json, results.csv (and plots)")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case; exit 1 on a regression")
    p.add_argument("--threshold", type=non_negative(float), default=10.0,
                   help="regression threshold in %% (default 10)")
    p.add_argument("--quick", action="store_true", help="small cases, few repeats")
    p.add_argument("--no-plots", action="store_true", help="no PNG figures")


def _model_options(p, defaults):
    """The options unet and sweep share, with the defaults of their config class."""
    p.add_argument("--warmup", type=non_negative(int), help=f"untimed runs per case (default {defaults.warmup})")
    p.add_argument("--tolerance", type=non_negative(float),
                   help=f"max abs output error vs diffusers' own processors (default {defaults.tolerance:g})")


def _op_parser(sub):
    p = sub.add_parser("op", help="fused attention vs SDPA vs the materialising path (and on cuda xformers, "
                                  "flash-attn where installed)")
    _common(p, "op", f"default {op.REPEATS}, --quick and --scaling {op.QUICK_REPEATS}")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                   help=f"default: {' '.join(op.DEFAULT_DTYPES['cpu'])} on cpu "
                        f"({' '.join(op.SCALING_DTYPES['cpu'])} with --scaling), {' '.join(op.DEFAULT_DTYPES['cuda'])} on cuda")
    p.add_argument("--shapes", type=shape_arg, nargs="+",
                   help=f"BxHxNxD, NxD or N (default: N in {' '.join(map(str, op.DEFAULT_NS['cpu']))}, D in "
                        f"{' '.join(map(str, op.DEFAULT_DS['cpu']))} on cpu; N in {' '.join(map(str, op.DEFAULT_NS['cuda']))}, "
                        f"D in {' '.join(map(str, op.DEFAULT_DS['cuda']))} on cuda; --quick: N={op.QUICK_N} D={op.QUICK_D})")
    p.add_argument("--b", type=positive(int), default=op.B, help="batch of NxD and N shapes")
    p.add_argument("--h", type=positive(int), default=op.H, help="heads of NxD and N shapes")
    p.add_argument("--impl", nargs="+", choices=implementations.ALL_NAMES, metavar="NAME",
                   help=f"implementations, of {', '.join(implementations.IMPLEMENTATIONS)} on cpu and "
                        f"{', '.join([*implementations.CUDA_IMPLEMENTATIONS, *implementations.OPTIONAL_BASELINES])} "
                        "on cuda (default: all for the device; on cuda the optional baselines that import)")
    p.add_argument("--scaling", action="store_true",
                   help=f"N = {op.SCALING_NS[0]} .. {op.SCALING_NS[-1]} (--quick: .. {op.SCALING_QUICK_NS[-1]}), "
                        "B=1 H=2 D=64 unless --shapes; fit time and memory ~ N^k")
    p.add_argument("--mem-budget-gib", type=positive(float), default=op.MEM_BUDGET_GIB,
                   help=f"skip the materialising path where it would need more (cpu; default {op.MEM_BUDGET_GIB:g})")
    p.set_defaults(func=run_op_command)


def _unet_parser(sub):
    defaults, quick = configs.UnetConfig, configs.UNET_QUICK
    p = sub.add_parser("unet", help="diffusers forward passes per attention processor: SD-like blocks and a tiny UNet")
    _common(p, "unet", f"default {defaults.repeats}, --quick {quick['repeats']}")
    p.add_argument("--latent", type=positive(int),
                   help=f"SD-block latent side, N = latent^2 (default {defaults.latent}, --quick {quick['latent']})")
    p.add_argument("--widths", type=positive(int), nargs="+",
                   help=f"SD-block widths, 8 heads each (default {' '.join(map(str, defaults.widths))})")
    p.add_argument("--sd-batch", type=positive(int), help=f"images per SD-block forward (default {defaults.sd_batch})")
    p.add_argument("--unet-batch", type=positive(int),
                   help=f"images per tiny-UNet forward (default {defaults.unet_batch}, --quick {quick['unet_batch']})")
    p.add_argument("--impl", nargs="+", choices=configs.UNET_IMPLEMENTATIONS, metavar="NAME",
                   help=f"implementations, of {', '.join(configs.UNET_IMPLEMENTATIONS)} (default: all; sdpa, the "
                        "reference of the others, always runs first)")
    _model_options(p, defaults)
    p.set_defaults(func=run_unet_command)


def _sweep_parser(sub):
    defaults, quick = configs.SweepConfig, configs.SWEEP_QUICK
    from diffcirc.bench import sweep

    p = sub.add_parser("sweep", help="the single-head ablation sweep of a UNet: one condition at a time vs batched "
                                     "vs batched with reuse of the clean pass")
    _common(p, "sweep", f"default {defaults.repeats}, --quick {quick['repeats']}")
    p.add_argument("--images", type=positive(int),
                   help=f"images per condition (default {defaults.images}, --quick {quick['images']})")
    p.add_argument("--conditions", type=positive(int), nargs="+",
                   help="numbers of conditions: the clean run + the first single-head ablations "
                        f"(default: all 25, --quick {' '.join(map(str, quick['conditions']))})")
    p.add_argument("--max-batch", type=positive(int), nargs="+",
                   help="batch elements per batched pass (default: images x 1, 5 and all conditions)")
    p.add_argument("--model", nargs="+", choices=list(sweep.MODELS), default=list(sweep.DEFAULT_MODELS),
                   help="the UNets to sweep (default: %(default)s; sd15: SD 1.5's architecture at a 32x32 latent)")
    p.add_argument("--heads-per-layer", type=positive(int),
                   help="ablate only the first K heads of each layer (default: every head)")
    _model_options(p, defaults)
    p.set_defaults(func=run_sweep_command)


def _joint_parser(sub):
    from diffcirc.bench import joint

    p = sub.add_parser("joint", help="a Flux-like joint-attention layer read as per-token heatmaps: SDPA vs fused vs "
                                     "fused + key-group mass vs the materialising map")
    _common(p, "joint", f"default {joint.REPEATS}, --quick {joint.QUICK['repeats']}")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--heads", type=positive(int), help=f"default {joint.HEADS} (Flux: {joint.FLUX_HEADS}); "
                                                       f"--quick {joint.QUICK['h']}")
    p.add_argument("--n-img", type=positive(int), help=f"image tokens (default {joint.N_IMG}: Flux at 1024²; "
                                                       f"--quick {joint.QUICK['n_img']})")
    p.add_argument("--n-txt", type=positive(int), help=f"text tokens, one group each (default {joint.N_TXT}; "
                                                       f"--quick {joint.QUICK['n_txt']})")
    p.add_argument("--d", type=positive(int), help=f"head dim (default {joint.D})")
    p.add_argument("--impl", nargs="+", choices=list(joint.IMPLEMENTATIONS), help="default: all")
    p.set_defaults(func=run_joint_command)


def _sass_parser(sub):
    p = sub.add_parser("sass", help="a static report of the CUDA kernels' machine code (registers, spills, CTAs per "
                                    "SM, SASS instructions per HMMA), read with cuobjdump: no GPU needed")
    p.add_argument("--extension", metavar="PATH", help="a built diffcirc._C, or an object file nvcc compiled from one "
                                                       "head-dim bucket (default: the diffcirc._C imported)")
    p.add_argument("--kernels", metavar="REGEX", help='only the kernels whose "<kernel> <variant> <dtype> <head dim>" '
                                                      'matches, e.g. "fwd.* plain bf16 (64|128)$" (default: all)')
    p.add_argument("--out", default=os.path.join("runs", "bench", "sass"), help="directory for results.json, results.csv")
    p.set_defaults(func=run_sass_command)


def _compare_parser(sub):
    p = sub.add_parser("compare", help="compare two results.json files")
    p.add_argument("new")
    p.add_argument("old")
    p.add_argument("--threshold", type=non_negative(float), default=10.0)
    p.set_defaults(func=lambda a: compare_files(a.new, a.old, a.threshold))


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark the fused op or a UNet; JSON, CSV, plots, --compare",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench_command", metavar="{op,unet,sweep,joint,sass,compare}")
    for add in (_op_parser, _unet_parser, _sweep_parser, _joint_parser, _sass_parser, _compare_parser):
        add(sub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def compare_files(new_path: str, old_path: str, threshold: float, out=None) -> int:
    """Prints the per-case change of new vs old; 1 when any case slowed by more than threshold %."""
    from diffcirc.bench.results import read_rows

    return compare_rows(read_rows(new_path), old_path, threshold, out)


def compare_rows(new_rows: list, old_path: str, threshold: float, out=None) -> int:
    from diffcirc.bench.results import compare, read_rows

    out = out or sys.stdout
    changes = compare(read_rows(old_path), new_rows, threshold)
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


def _start(args, header: str):
    """Threads, the warning when 'fused' would not time the compiled kernel, the table's header."""
    import torch

    from diffcirc.bench.machine import fused_path_warning

    torch.set_num_threads(args.threads)
    warning = fused_path_warning(args.device)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(header)
    print("-" * len(header))


def _meta(args, kind: str, **extra) -> dict:
    from diffcirc.bench.machine import full_machine_info

    return {**full_machine_info(args.device), "kind": kind,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in vars(args).items() if k != "func"}, **extra}


def _title(meta: dict) -> str:
    """A plot title naming the machine: CPU or GPU, torch, ISA."""
    return f"{meta['cpu'] if meta['device'] == 'cpu' else meta['gpu']} · torch {meta['torch']} · {meta['isa']}"


def _finish(args, meta, rows, plot, **extra) -> int:
    """Writes results.json, results.csv and (unless --no-plots, or plot is None) plot(rows, out,
    title)'s PNGs into --out, then compares with --compare; returns the exit status."""
    from diffcirc.bench.results import write_results

    paths = write_results(args.out, meta, rows, **extra)
    if plot is not None and not args.no_plots:
        paths += plot(rows, args.out, title=_title(meta))
    print("wrote " + " ".join(paths))
    return compare_rows(rows, args.compare, args.threshold) if args.compare else 0


def _refused(error) -> int:
    print(f"error: refused (not timed): {error}", file=sys.stderr)
    return EXIT_REFUSED


def run_op_command(args) -> int:
    from diffcirc.bench import scaling
    from diffcirc.bench.gate import IncorrectImplementation
    from diffcirc.bench.plots import write_plots

    try:
        impls, unavailable, status = implementations.choose(args.device, args.impl)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("optional baselines: " + "; ".join(f"{n}: {why}" for n, why in status.items()))
    given = [op.parse_shape(s, args.b, args.h) for s in args.shapes or ()]
    shapes = op.default_shapes(args.device, args.b, args.h, args.quick, args.scaling, given)
    dtypes = args.dtype or op.default_dtypes(args.device, args.scaling)
    repeats = args.repeats or (op.QUICK_REPEATS if args.quick or args.scaling else op.REPEATS)
    budget = args.mem_budget_gib * 2**30 if args.device == "cpu" else None
    _start(args, op.HEADER)
    with_peak = args.device == "cpu" and not args.scaling
    peak_before = op.gemm_peak(dtypes, max(repeats, op.PEAK_REPEATS)) if with_peak else None
    try:
        rows = op.run_op(shapes, dtypes, impls, args.device, repeats, budget, unavailable)
    except IncorrectImplementation as e:
        return _refused(e)
    for line in op.cost_lines(rows):
        print(line)
    extra = {}
    if with_peak:
        extra["gemm_peak_gflops"] = op.gemm_peak(dtypes, max(repeats, op.PEAK_REPEATS), best_of=peak_before)
        for line in op.peak_lines(rows, extra["gemm_peak_gflops"]):
            print(line)
    if args.scaling:
        extra["fits"] = scaling.scaling_fits(rows)
        print("\nscaling (least squares on log-log):")
        print(scaling.format_fits(extra["fits"]))
    meta = _meta(args, "op", optional_baselines=status)
    return _finish(args, meta, rows, write_plots, **extra)


def run_unet_command(args) -> int:
    from diffcirc.bench import unet
    from diffcirc.bench.gate import IncorrectImplementation
    from diffcirc.bench.plots import write_unet_plots

    cfg = configs.unet_config(args.quick, latent=args.latent, widths=args.widths, sd_batch=args.sd_batch,
                      unet_batch=args.unet_batch, impl=args.impl, warmup=args.warmup, repeats=args.repeats,
                      tolerance=args.tolerance)
    _start(args, unet.HEADER)
    try:
        rows = unet.run_unet(cfg, args.device)
    except IncorrectImplementation as e:
        return _refused(e)
    return _finish(args, _meta(args, "unet", config=dataclasses.asdict(cfg)), rows, write_unet_plots)


def run_sweep_command(args) -> int:
    from diffcirc.bench import sweep
    from diffcirc.bench.gate import IncorrectImplementation
    from diffcirc.bench.plots import write_sweep_plots

    cfg = configs.sweep_config(args.quick, images=args.images, conditions=args.conditions, max_batch=args.max_batch,
                       warmup=args.warmup, repeats=args.repeats, tolerance=args.tolerance)
    _start(args, sweep.HEADER)
    try:
        rows = sweep.run_sweep(cfg, args.device, models=tuple(args.model), heads_per_layer=args.heads_per_layer)
    except IncorrectImplementation as e:
        return _refused(e)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _finish(args, _meta(args, "sweep", config=dataclasses.asdict(cfg)), rows, write_sweep_plots)


def run_joint_command(args) -> int:
    from diffcirc.bench import joint
    from diffcirc.bench.gate import IncorrectImplementation

    size = {k: v for k, v in (("h", args.heads), ("n_img", args.n_img), ("n_txt", args.n_txt), ("d", args.d),
                              ("repeats", args.repeats)) if v is not None}
    case = {**(joint.QUICK if args.quick else joint.DEFAULTS), **size}
    _start(args, joint.HEADER)
    try:
        rows = joint.run_joint(dtype=args.dtype, names=args.impl, device=args.device, **case)
    except IncorrectImplementation as e:
        return _refused(e)
    for line in joint.summary_lines(rows):
        print(line)
    return _finish(args, _meta(args, "joint", case=case), rows, None)


def run_sass_command(args) -> int:
    from diffcirc.bench import sass
    from diffcirc.bench.machine import machine_info
    from diffcirc.bench.results import write_results

    try:
        tool = sass.find_cuobjdump()
        path = args.extension or sass.extension_path()
        rows = sass.report(path, tool, args.kernels)
    except sass.SassUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path} (read with {tool})")
    print(sass.HEADER)
    print("-" * len(sass.HEADER))
    for r in rows:
        print(sass.format_row(r))
    meta = {**machine_info(), "kind": "sass", "extension": path, "cuobjdump": tool,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print("wrote " + " ".join(write_results(args.out, meta, rows)))
    return 0
