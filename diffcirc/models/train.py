"""DDPM training of the paper-like UNet on a mix of datasets, resumable with identical state.

The data of a run is small (a few thousand 32x32 images), so it is rendered once into memory;
each step draws a batch with replacement, weighting each mix component by its ``:COUNT``.
Every random draw of the loop (batch indices, timesteps, noise) comes from one torch.Generator
whose state is checkpointed, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import load_dataset, parse_mix
from ..files import write_json
from .checkpoint import find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .load import ModelLoadError
from .sampling import sample, save_grid
from .unet import build_scheduler, build_unet

# Synthetic components of a mix get disjoint seed ranges inside the training range: component k
# starts at k * MIX_SEED_STRIDE, so "synthetic" and "synthetic-gray" never show the same face.
MIX_SEED_STRIDE = 100_000


class CheckpointMismatchError(ModelLoadError):
    """A run folder whose checkpoint was made with other settings (data, size, batch size, seed) than
    the run resuming from it. A ModelLoadError (a ValueError): the CLI reports it in one line."""


@dataclasses.dataclass
class TrainConfig:
    out: str
    data: str = "synthetic:5000,synthetic-gray:5000,lfw-train:2500"  # the bundled model's mix
    size: int = 32
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 200  # linear learning-rate warm-up steps
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 500  # 0: no sample grids
    sample_steps: int = 50
    log_every: int = 50
    threads: int = 1
    progress: bool = True


_GENERATED = ("synthetic", "synthetic-gray", "photos")  # mix components rendered from seeds


def check_mix(mix: str) -> list[tuple[str, int | None]]:
    """``parse_mix(mix)`` after checking, without rendering anything, that every component can be built
    and that synthetic components keep to their own seed range (component k draws seeds
    k * MIX_SEED_STRIDE .. + COUNT, below TRAIN_SEED_COUNT); raises ValueError or FileNotFoundError."""
    from ..data import TRAIN_SEED_COUNT, check_spec
    from ..data.specs import DEFAULT_N

    parts = parse_mix(mix)
    for k, (spec, count) in enumerate(parts):
        check_spec(spec)
        if spec in ("synthetic", "synthetic-gray"):  # the only components drawn from the training seed range
            n = DEFAULT_N if count is None else count
            if n > MIX_SEED_STRIDE:
                raise ValueError(f"mix component {spec}:{n}: a synthetic component holds at most {MIX_SEED_STRIDE} "
                                 "images, so that components never share a seed")
            if k * MIX_SEED_STRIDE + n > TRAIN_SEED_COUNT:
                raise ValueError(f"mix {mix!r} has too many components: component {k + 1} would draw seeds beyond "
                                 f"the training range (< {TRAIN_SEED_COUNT})")
    return parts


def build_training_data(mix: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Render a mix into memory.

    Returns images (N, 3, size, size) float32 in [-1, 1] (each distinct item once), sampling weights
    (N,) so that component k is drawn in proportion to its COUNT, and a description per component.
    """
    images, weights, parts = [], [], []
    for k, (spec, count) in enumerate(check_mix(mix)):
        generated = spec in _GENERATED
        ds = load_dataset(spec, size=size, n=count if generated else None, seed=k * MIX_SEED_STRIDE, split="train")
        imgs = torch.stack([ds[i]["image"] for i in range(len(ds))])
        count = len(ds) if count is None else count
        images.append(imgs)
        weights.append(torch.full((len(ds),), count / len(ds), dtype=torch.float64))
        parts.append({"spec": spec, "count": count, "distinct": len(ds), "seed": k * MIX_SEED_STRIDE})
    return torch.cat(images), torch.cat(weights), parts


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, step: int, decay: float) -> None:
    # Warm-up of the decay (as in diffusers' EMAModel) so early EMA weights are not dominated by the init.
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in model.state_dict().items():
            ema[name].mul_(d).add_(p.detach(), alpha=1 - d)


def train(cfg: TrainConfig, command: str | None = None) -> dict:
    """Run (or resume) training into ``cfg.out``; returns the final state dict (step, losses, ...).

    cfg.out/checkpoint/   resumable state (see checkpoint.py), written every cfg.checkpoint_every steps
    cfg.out/samples/      sample grids of the EMA model every cfg.sample_every steps
    cfg.out/ema/          at the end: EMA UNet + scheduler in diffusers' save_pretrained layout, training.json
    cfg.out/log.jsonl     step, loss, lr, grad norm every cfg.log_every steps
    """
    check_mix(cfg.data)  # a bad mix fails now, not after the model is built and a checkpoint read
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # model initialisation
    unet = build_unet(cfg.size).train()
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    state = {"step": 0, "losses": [], "elapsed_s": 0.0, "config": dataclasses.asdict(cfg)}

    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    found = find_checkpoint(ckpt_dir)
    if found:
        # settings first: a checkpoint of another size would otherwise fail inside load_state_dict
        saved = read_state(found)["config"]
        changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                   if k in ("data", "size", "batch_size", "seed") and saved.get(k) != v}
        if changed:
            raise CheckpointMismatchError(
                f"checkpoint in {ckpt_dir} was made with different settings (saved, now): {changed}; resume with the "
                "saved settings, or train into another --out")
        ema, state = load_checkpoint(found, model=unet, optimizer=optimizer, generator=generator)
        state["config"] = dataclasses.asdict(cfg)

    images, weights, parts = build_training_data(cfg.data, cfg.size)
    alphas = scheduler.alphas_cumprod
    T = scheduler.config.num_train_timesteps
    start, t_start = state["step"], time.time() - state["elapsed_s"]
    log = open(os.path.join(cfg.out, "log.jsonl"), "a")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, file=sys.stderr)
    running = None
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=generator)
        x0 = images[idx]
        t = torch.randint(0, T, (cfg.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip))
        optimizer.step()
        _ema_update(ema, unet, step, cfg.ema_decay)

        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}")
        state["losses"].append(value)
        state["step"] = step + 1
        state["elapsed_s"] = time.time() - t_start
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % cfg.log_every == 0:
            log.write(json.dumps({"step": step + 1, "loss": value, "loss_avg": running, "lr": lr, "grad_norm": gnorm,
                                  "elapsed_s": round(state["elapsed_s"], 1)}) + "\n")
            log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_dir, model=unet, ema=ema, optimizer=optimizer, generator=generator, state=state)
        if cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps):
            _write_samples(ema, unet.config, scheduler, cfg, step + 1)
    log.close()
    if state["step"] >= cfg.steps:
        export_ema(ema, unet.config, scheduler, os.path.join(cfg.out, "ema"),
                   {"command": command, "steps": state["step"], "data": cfg.data, "data_components": parts,
                    "wall_time_s": round(state["elapsed_s"], 1), "config": dataclasses.asdict(cfg),
                    "final_loss_avg_last_100": sum(state["losses"][-100:]) / max(len(state["losses"][-100:]), 1),
                    "torch": torch.__version__})
    return state


def _ema_unet(ema: dict[str, torch.Tensor], config):
    from diffusers import UNet2DModel

    model = UNet2DModel.from_config(config)
    model.load_state_dict(ema)
    return model.eval()


def _write_samples(ema, config, scheduler, cfg: TrainConfig, step: int) -> None:
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    imgs = sample(_ema_unet(ema, config), scheduler, n=32, steps=cfg.sample_steps, seed=0)
    save_grid(imgs, os.path.join(cfg.out, "samples", f"step_{step:07d}.png"), nrow=8, scale=2)


def export_ema(ema, config, scheduler, folder: str, info: dict) -> None:
    """EMA UNet + scheduler config in diffusers' layout (config.json, diffusion_pytorch_model.safetensors,
    scheduler_config.json) plus training.json with ``info``."""
    unet = _ema_unet(ema, config)
    unet.save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder)
    write_json(info, os.path.join(folder, "training.json"))
