"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

Layout of a checkpoint folder:
    model.safetensors      training weights (UNet state_dict)
    ema.safetensors        EMA weights
    optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>" (e.g. "12.exp_avg")
    rng.safetensors        "generator": the training torch.Generator state (uint8)
    state.json             step, config, optimizer param_groups, loss history, elapsed seconds

Saving writes a fresh folder next to the target and swaps it in with renames, so an interruption
leaves either the previous or the new checkpoint, never a half-written one. Loading checks every file
first and raises ``CorruptWeightsError`` / ``WeightsMismatchError`` naming it; it never deletes or
rewrites a damaged checkpoint, so nothing is lost by a failed resume.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_folder, previous_folder
from .load import CorruptWeightsError, WeightsMismatchError, check_safetensors

TENSOR_FILES = ("model", "ema", "optimizer", "rng")


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
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
        opt_tensors, groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file({"generator": generator.get_state()}, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "param_groups": groups}, f, indent=1)


def find_checkpoint(path: str) -> str | None:
    """``path`` if it holds a complete checkpoint, else the previous one left by an interrupted save."""
    for cand in (path, previous_folder(path)):
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    return None


def _restart_hint(path: str) -> str:
    return f"delete {path!r} to train from scratch (its progress is lost) or restore it from a copy"


def read_state(path: str) -> dict:
    """state.json of the checkpoint folder ``path`` (step, config, param_groups, ...), checked to be complete."""
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptWeightsError(f"checkpoint file {file!r} is not valid JSON ({e}); {_restart_hint(path)}") from None
    missing = [k for k in ("step", "config", "param_groups") if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["config"], dict):
        raise CorruptWeightsError(f"checkpoint file {file!r} lacks {missing or ['a config object']}; "
                                  f"{_restart_hint(path)}")
    return state


def _check_like(tensors: dict[str, torch.Tensor], model: torch.nn.Module, file: str, path: str) -> None:
    """The tensors of ``file`` must be exactly the model's: same names, same shapes, finite."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise WeightsMismatchError(f"checkpoint file {file!r} does not fit the model being trained "
                                   f"({len(diff)} tensor(s) differ, e.g. {diff[:3]}); {_restart_hint(path)}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CorruptWeightsError(f"checkpoint file {file!r} holds NaN or inf in {bad[:3]}; {_restart_hint(path)}")


def load_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore model, optimizer and generator in place; return (ema tensors, state dict from JSON).

    Every tensor file is checked (complete, same names and shapes as the model, finite) before
    anything is restored, so a damaged or mismatched file raises naming it.
    """
    state = read_state(path)
    files = {name: os.path.join(path, f"{name}.safetensors") for name in TENSOR_FILES}
    for file in files.values():
        check_safetensors(file, _restart_hint(path))
    tensors = {name: load_file(file) for name, file in files.items()}
    for name in ("model", "ema"):
        _check_like(tensors[name], model, files[name], path)
    if set(tensors["rng"]) != {"generator"}:
        raise CorruptWeightsError(f"checkpoint file {files['rng']!r} holds {sorted(tensors['rng'])}, expected "
                                  f"['generator']; {_restart_hint(path)}")
    model.load_state_dict(tensors["model"])
    try:
        load_optimizer(optimizer, tensors["optimizer"], state.pop("param_groups"))
        generator.set_state(tensors["rng"]["generator"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:  # what torch raises for a state of another shape
        raise CorruptWeightsError(f"checkpoint {path!r} holds an optimizer or RNG state that does not fit this "
                                  f"run ({type(e).__name__}: {e}); {_restart_hint(path)}") from e
    return tensors["ema"], state
