"""``diffcirc train``: DDPM training of the paper-like UNet on a dataset mix (resumable)."""

from __future__ import annotations

import dataclasses
import shlex
import sys

from ._checks import dataset_mix, fraction, int_in, non_negative, positive, reports_input_errors, writable_folder

# The range of every TrainConfig field: a bad value is a usage error now, not a traceback (or a
# silently useless run, e.g. --lr 0) after the data has been rendered.
_TYPES = {
    "steps": positive(int),
    "batch_size": positive(int),
    "lr": positive(float),
    "warmup": non_negative(int),
    "weight_decay": non_negative(float),
    "ema_decay": fraction,
    "grad_clip": positive(float),
    "seed": non_negative(int),
    "checkpoint_every": positive(int),
    "sample_every": non_negative(int),
    "sample_steps": int_in(1, 1000),  # at most the scheduler's 1000 training timesteps
    "log_every": positive(int),
    "threads": positive(int),
}
_CHOICES = {"size": (32, 64)}  # the sizes build_unet has levels for


def register(subparsers):
    from diffcirc.models.train import TrainConfig

    defaults = TrainConfig(out="")
    p = subparsers.add_parser("train", help="train the paper-like DDPM UNet (resumes from OUT/checkpoint)")
    p.add_argument("--out", type=writable_folder, required=True,
                   help="run folder: checkpoint/, samples/, log.jsonl, ema/ (checked to be writable first)")
    p.add_argument("--data", type=dataset_mix, default=defaults.data,
                   help="comma-separated dataset specs with optional :COUNT (default: %(default)s)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("out", "data", "progress"):
            continue
        p.add_argument("--" + field.name.replace("_", "-"),
                       type=_TYPES.get(field.name, type(getattr(defaults, field.name))),
                       choices=_CHOICES.get(field.name), default=getattr(defaults, field.name),
                       help="default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=_run)
    return p


@reports_input_errors
def _run(args) -> int:
    from diffcirc.models.train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "progress"},
                      progress=not args.no_progress)
    command = "diffcirc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    state = train(cfg, command=command)
    print(f"trained {state['step']} steps in {state['elapsed_s']:.0f} s; EMA weights in {cfg.out}/ema")
    return 0
