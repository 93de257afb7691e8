"""``diffcirc train``: DDPM training of the paper-like UNet on a dataset mix (resumable)."""

from __future__ import annotations

import dataclasses
import shlex
import sys


def register(subparsers):
    from diffcirc.models.train import TrainConfig

    defaults = TrainConfig(out="")
    p = subparsers.add_parser("train", help="train the paper-like DDPM UNet (resumes from OUT/checkpoint)")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, samples/, log.jsonl, ema/")
    p.add_argument("--data", default=defaults.data,
                   help="comma-separated dataset specs with optional :COUNT (default: %(default)s)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("out", "data", "progress"):
            continue
        p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name), help="default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from diffcirc.models.train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "progress"},
                      progress=not args.no_progress)
    command = "diffcirc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    state = train(cfg, command=command)
    print(f"trained {state['step']} steps in {state['elapsed_s']:.0f} s; EMA weights in {cfg.out}/ema")
    return 0
