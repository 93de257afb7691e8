"""Loading a UNet and its DDPM scheduler: the bundled default, a local diffusers folder, or a hub id.

Weights are read only from safetensors files (``use_safetensors=True``); nothing is unpickled.
"""

from __future__ import annotations

import json
import os

import torch

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "bundled")


def _unet_class(config: dict):
    import diffusers

    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, name, None)
    if cls is None or "UNet" not in name:
        raise ValueError(f"config names class {name!r}, which is not a diffusers UNet")
    return cls


def _local(folder: str):
    """(unet folder, scheduler config folder or None) for a pipeline folder or a bare UNet folder."""
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        sched = os.path.join(folder, "scheduler")
        if not os.path.isfile(os.path.join(sched, "scheduler_config.json")):
            sched = folder if os.path.isfile(os.path.join(folder, "scheduler_config.json")) else None
        return os.path.join(folder, "unet"), sched
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, folder if os.path.isfile(os.path.join(folder, "scheduler_config.json")) else None
    raise FileNotFoundError(f"{folder!r} holds neither unet/config.json nor config.json")


def load(name_or_path: str = "bundled", device: str | None = None, dtype=None):
    """-> (unet in eval mode, DDPMScheduler).

    name_or_path: "bundled" (the default model shipped in diffcirc/weights/bundled), a local folder
    (a pipeline folder with unet/ and scheduler/ subfolders, or a UNet folder, optionally with its
    scheduler_config.json beside config.json), or a Hugging Face hub id (pipeline or UNet repo;
    downloaded by diffusers). Without a scheduler config the DDPM default of ``build_scheduler`` is used.
    """
    from diffusers import DDPMScheduler

    from .unet import build_scheduler

    path = BUNDLED if name_or_path == "bundled" else name_or_path
    if os.path.isdir(path):
        unet_dir, sched_dir = _local(path)
        with open(os.path.join(unet_dir, "config.json")) as f:
            cls = _unet_class(json.load(f))
        unet = cls.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)  # no `accelerate` needed
        scheduler = DDPMScheduler.from_pretrained(sched_dir) if sched_dir else build_scheduler()
    elif name_or_path == "bundled":
        raise FileNotFoundError(f"bundled weights missing at {BUNDLED}")
    else:
        unet, scheduler = _from_hub(name_or_path)
    unet = unet.eval()
    # only move when needed: a no-op .to() still makes diffusers warn about dtype casting
    if (device is not None and torch.device(device) != unet.device) or (dtype is not None and dtype != unet.dtype):
        unet = unet.to(device=device, dtype=dtype)
    return unet, scheduler


def _from_hub(repo_id: str):
    """A hub repo laid out as a pipeline (unet/, scheduler/) or as a bare UNet (config.json at the root)."""
    from diffusers import DDPMScheduler, UNet2DModel

    for sub in ("unet", None):
        try:
            config = UNet2DModel.load_config(repo_id, subfolder=sub)
        except (OSError, EnvironmentError, ValueError):
            continue
        unet = _unet_class(config).from_pretrained(repo_id, subfolder=sub, use_safetensors=True, low_cpu_mem_usage=False)
        for sched_sub in (("scheduler",) if sub else ()) + (None,):
            try:
                return unet, DDPMScheduler.from_pretrained(repo_id, subfolder=sched_sub)
            except (OSError, EnvironmentError, ValueError):
                continue
        from .unet import build_scheduler

        return unet, build_scheduler()
    raise FileNotFoundError(f"{repo_id!r} is not a local folder and no UNet config was found for it on the hub")
