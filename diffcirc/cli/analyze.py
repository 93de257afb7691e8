"""``diffcirc analyze``: the study, end to end: trace, ablate, score, report."""

from __future__ import annotations

import argparse

from ._checks import (byte_size, dataset_spec, device, model_name, non_negative, positive, reports_input_errors,
                      timesteps, writable_folder)


def _modes(text):
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or set(modes) - {"zero", "mean"}:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of zero,mean, got {text!r}")
    return modes


def register(subparsers):
    p = subparsers.add_parser("analyze", help="run the circuit study and write tables, summary.json and a report",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", type=model_name, default="bundled", help="bundled | a local diffusers folder | a hub id")
    p.add_argument("--synthetic", type=positive(int), default=64, help="held-out synthetic faces (default 64)")
    p.add_argument("--synthetic-spec", default=None, choices=["synthetic", "synthetic-gray"],
                   help="synthetic-gray (default; matches grayscale LFW) or synthetic (colour, e.g. with CelebA)")
    p.add_argument("--natural", type=dataset_spec, default="lfw",
                   help="lfw | photos | celeba:PATH | folder:PATH (held-out split)")
    p.add_argument("--natural-n", type=positive(int), default=None, help="natural images (default: all held-out)")
    p.add_argument("--timesteps", type=timesteps, default=None, help="e.g. '50,150,...'; default 10 evenly spaced")
    p.add_argument("--ablation-timesteps", type=timesteps, default=None, help="default: every third trace timestep")
    p.add_argument("--ablation-images", type=positive(int), default=32)
    p.add_argument("--ablation-modes", type=_modes, default="zero,mean", help="comma-separated subset of zero,mean")
    p.add_argument("--circuit-threshold", type=positive(float), default=10.0, help="percent degradation allowed")
    p.add_argument("--role-control-reps", type=positive(int), default=5)
    p.add_argument("--no-random-control", action="store_true", help="skip the random-weights control model")
    p.add_argument("--batch-size", type=positive(int), default=64)
    p.add_argument("--max-batch", type=positive(int), default=64, help="batch elements per batched-conditions pass")
    p.add_argument("--max-memory", type=byte_size, default=None,
                   help="memory one batched pass may use, e.g. 2GiB (default: half of what is free)")
    p.add_argument("--seed", type=non_negative(int), default=0)
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--out", type=writable_folder, required=True, help="output folder (checked to be writable first)")
    p.set_defaults(func=run)
    return p


@reports_input_errors
def run(args) -> int:
    import torch

    from ..analysis.driver import AnalysisConfig, default_timesteps, run_analysis
    from ..report import print_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.ablation_modes
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
    if summary is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return 0
    print_summary(summary)
    print(f"\nreport: {out / 'report.html'}  (also report.md, summary.json, tables *.parquet)")
    return 0
