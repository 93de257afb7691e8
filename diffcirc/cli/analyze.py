"""``diffcirc analyze``: the study, end to end: trace, ablate, score, report."""

from __future__ import annotations

import argparse


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(text):
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return int(value)


def _timesteps(text):
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be integers, got {text!r}") from None
    if not values or any(not 0 <= v < 1000 for v in values):
        raise argparse.ArgumentTypeError(f"timesteps must lie in [0, 1000), got {text!r}")
    return values


def register(subparsers):
    p = subparsers.add_parser("analyze", help="run the circuit study and write tables, summary.json and a report",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", help="bundled | a local diffusers folder | a hub id")
    p.add_argument("--synthetic", type=_positive(int), default=64, help="held-out synthetic faces (default 64)")
    p.add_argument("--synthetic-spec", default=None,
                   help="synthetic-gray (default; matches grayscale LFW) or synthetic (colour, e.g. with CelebA)")
    p.add_argument("--natural", default="lfw", help="lfw | photos | celeba:PATH | folder:PATH (held-out split)")
    p.add_argument("--natural-n", type=_positive(int), default=None, help="natural images (default: all held-out)")
    p.add_argument("--timesteps", type=_timesteps, default=None, help="e.g. '50,150,...'; default 10 evenly spaced")
    p.add_argument("--ablation-timesteps", type=_timesteps, default=None, help="default: every third trace timestep")
    p.add_argument("--ablation-images", type=_positive(int), default=32)
    p.add_argument("--ablation-modes", default="zero,mean", help="comma-separated subset of zero,mean")
    p.add_argument("--circuit-threshold", type=_positive(float), default=10.0, help="percent degradation allowed")
    p.add_argument("--role-control-reps", type=_positive(int), default=5)
    p.add_argument("--no-random-control", action="store_true", help="skip the random-weights control model")
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--max-batch", type=_positive(int), default=64, help="batch elements per batched-conditions pass")
    p.add_argument("--max-memory", type=_bytes, default=None,
                   help="memory one batched pass may use, e.g. 2GiB (default: half of what is free)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from ..analysis.driver import AnalysisConfig, default_timesteps, run_analysis
    from ..report import print_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(m.strip() for m in args.ablation_modes.split(",") if m.strip())
    if not modes or set(modes) - {"zero", "mean"}:
        raise SystemExit(f"--ablation-modes must be a subset of zero,mean, got {args.ablation_modes!r}")
    spec = args.synthetic_spec or ("synthetic" if args.natural.startswith("celeba") else "synthetic-gray")
    config = AnalysisConfig(
        out=args.out, model=args.model, synthetic=args.synthetic, synthetic_spec=spec, natural=args.natural,
        natural_n=args.natural_n, timesteps=args.timesteps or default_timesteps(),
        ablation_timesteps=args.ablation_timesteps, ablation_modes=modes, ablation_images=args.ablation_images,
        circuit_threshold=args.circuit_threshold, role_control_reps=args.role_control_reps,
        random_control=not args.no_random_control, batch_size=args.batch_size, max_batch=args.max_batch,
        max_memory=args.max_memory,
        seed=args.seed, device=args.device)
    out, summary = run_analysis(config)
    print_summary(summary)
    print(f"\nreport: {out / 'report.html'}  (also report.md, summary.json, tables *.parquet)")
    return 0
