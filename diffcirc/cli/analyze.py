"""``diffcirc analyze``: the study, end to end: trace, ablate, score, then summary and report."""

from __future__ import annotations

import argparse

from ..analysis.config import CIRCUIT_ABLATIONS, DEFAULT_TIMESTEP_COUNT, DTYPES, AnalysisConfig
from ._checks import (byte_size, dataset_spec, device, model_name, non_negative, positive, reports_input_errors,
                      timesteps, writable_folder)
from .report import write_report

CONFIG_FIELDS = tuple(AnalysisConfig.defaults())


def _modes(text):
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or set(modes) - {"zero", "mean"}:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of zero,mean, got {text!r}")
    return modes


class _Controls(argparse.Action):
    """--controls NAME [NAME ...] as a tuple of known control names; "none" alone: no controls."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..analysis.controls import CONTROLS

        if values == ["none"]:
            setattr(namespace, self.dest, ())
            return
        unknown = [v for v in values if v not in CONTROLS]
        if unknown:
            parser.error(f"{option_string}: unknown control {unknown[0]!r}; choose from {', '.join(CONTROLS)}, or none")
        setattr(namespace, self.dest, tuple(dict.fromkeys(values)))


def register(subparsers):
    p = subparsers.add_parser("analyze", help="run the circuit study and write tables, summary.json and a report",
                              description=__doc__.splitlines()[0])
    d = AnalysisConfig.defaults()

    def option(name, **kwargs):
        """--name for the AnalysisConfig field of that name, with the field's default."""
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=d[name], **kwargs)

    option("model", type=model_name, help="bundled | a pixel UNet folder | a diffusers pipeline folder "
                                           "(model_index.json) | a hub id in the local cache (default %(default)s)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", dest="prompt", default=d["prompt"],
                      help="the conditioning of a text-conditioned pipeline, encoded once by its own text encoders "
                           "(default: empty, the unconditional prompt)")
    text.add_argument("--prompt-embeds", dest="prompt_embeds", default=d["prompt_embeds"],
                      help="instead of --prompt: a safetensors file with prompt_embeds (1, L, C) and, where the model "
                           "takes it, pooled_prompt_embeds (1, P)")
    option("max_sequence_length", type=positive(int), help="T5 tokens of SD3 (default 256) and Flux (default 512) "
                                                            "prompts")
    option("size", type=positive(int), help="image resolution in pixels (default: the model's)")
    option("synthetic", type=positive(int), help="held-out synthetic faces (default %(default)s)")
    option("synthetic_spec", choices=["synthetic", "synthetic-gray"],
           help="synthetic (colour) or synthetic-gray; default: synthetic with celeba, else synthetic-gray "
                "(matches grayscale LFW)")
    option("natural", type=dataset_spec, help="lfw | photos | celeba:PATH | folder:PATH (held-out split; "
                                               "default %(default)s)")
    option("natural_n", type=positive(int), help="natural images (default: all held-out)")
    option("timesteps", type=timesteps, help=f"in the scheduler's units, e.g. '50,150,...' (default: "
                                             f"{DEFAULT_TIMESTEP_COUNT} quantiles of the model's training timesteps "
                                             f"at --size: 50,150,...,950 on DDPM schedules, the shifted sigma grid's "
                                             f"on flow-matching ones)")
    option("ablation_timesteps", type=timesteps, help="default: every third trace timestep")
    option("ablation_images", type=positive(int), help="images per dataset (default %(default)s)")
    option("ablation_modes", type=_modes, help=f"comma-separated subset of zero,mean "
                                               f"(default {','.join(d['ablation_modes'])})")
    option("circuit_threshold", type=positive(float), help="percent degradation allowed (default %(default)s)")
    option("circuit_random_sets", type=non_negative(int),
           help="random head sets of the circuit's removed-set size it is compared with on held-out images "
                "(default %(default)s)")
    option("circuit_resamples", type=non_negative(int),
           help="bootstrap resamples of the selection images, each searched again for the circuit's stability "
                "(default %(default)s)")
    option("circuit_ablation", choices=CIRCUIT_ABLATIONS,
           help="how the heads outside the circuit are removed: zero, or mean (each head's mean output per position "
                "over the selection images at the same timestep: in sample during the selection, held out when the "
                "circuit and the random sets are evaluated on the held-out images; default %(default)s)")
    option("role_control_reps", type=positive(int),
           help="layer-matched random head sets per role, at most: every such set when there are fewer; the "
                "one-sided rank p cannot go below 1 / (sets + 1) (default %(default)s)")
    option("ig_steps", type=non_negative(int), help="integrated-gradient steps of the attribution over the head "
                                                   "gates, one backward pass each (0: first-order only; default "
                                                   "%(default)s)")
    p.add_argument("--no-random-control", dest="random_control", action="store_false", default=d["random_control"],
                   help="skip the random-weights control model")
    option("controls", nargs="+", action=_Controls, metavar="CONTROL",
           help="matched-stimulus control sets traced beside the natural/synthetic complexity ratio: framing "
                "(synthetic faces cropped to the natural set's face box), spectrum (synthetic images with the "
                "natural radial amplitude spectrum and channel moments), seen (natural training images); "
                "none for no controls (default: " + " ".join(d["controls"]) + ")")
    option("control_n", type=positive(int), help="images per control set, at most the synthetic set's (default: as many as it has)")
    option("batch_size", type=positive(int), help="images per traced forward pass at most (default %(default)s)")
    option("vae_batch_size", type=positive(int), help="images per VAE encoder pass of a latent model at most "
                                                       "(default %(default)s)")
    option("max_batch", type=positive(int), help="batch elements per batched-conditions pass (default %(default)s)")
    option("max_memory", type=byte_size, help="memory one forward pass (traced, batched conditions, VAE) may use, "
                                               "e.g. 2GiB (default: half of what is free)")
    option("seed", type=non_negative(int), help="default %(default)s")
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    option("device", type=device, help="default %(default)s")
    option("dtype", choices=DTYPES, help="of the denoiser and text encoders (default %(default)s; the VAE stays "
                                         "float32, every loss is computed in float32)")
    p.add_argument("--out", type=writable_folder, required=True, help="output folder (checked to be writable first)")
    option("wait", action="store_true",
           help="when another run holds --out, wait for it to end, then resume from its finished units "
                "(default: refuse at once)")
    p.set_defaults(func=run)
    return p


def config_from_args(args) -> AnalysisConfig:
    """The AnalysisConfig of parsed ``analyze`` arguments (fields without an option keep their default)."""
    return AnalysisConfig(**{name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)})


@reports_input_errors
def run(args) -> int:
    import torch

    from ..analysis import driver

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    out = driver.run_analysis(config)
    if out is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return 0
    return write_report(out, n_resamples=config.bootstrap, seed=config.seed)
