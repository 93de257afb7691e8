"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

Layout of a checkpoint folder:
    model.safetensors      training weights (UNet state_dict)
    ema.safetensors        EMA weights
    optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>" (e.g. "12.exp_avg")
    rng.safetensors        "generator": the training torch.Generator state (uint8)
    state.json             step, config, optimizer param_groups, loss history, elapsed seconds

Saving writes a fresh folder next to the target and swaps it in with renames, so an interruption
leaves either the previous or the new checkpoint, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer state_dict into flat tensors (safetensors) and JSON-able param_groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{idx}.{name}"] = value.detach().clone().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(path: str, *, model: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: dict) -> None:
    """Write the checkpoint folder ``path`` atomically (see module docstring)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
    opt_tensors, groups = optimizer_tensors(optimizer)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    save_file({"generator": generator.get_state()}, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "param_groups": groups}, f, indent=1)
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str) -> str | None:
    """``path`` if it holds a complete checkpoint, else the previous one left by an interrupted save."""
    for cand in (path, path + ".old"):
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    return None


def load_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore model, optimizer and generator in place; return (ema tensors, state dict from JSON)."""
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    load_optimizer(optimizer, load_file(os.path.join(path, "optimizer.safetensors")), state.pop("param_groups"))
    generator.set_state(load_file(os.path.join(path, "rng.safetensors"))["generator"])
    return load_file(os.path.join(path, "ema.safetensors")), state
