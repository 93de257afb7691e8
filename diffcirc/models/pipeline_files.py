"""Where the parts of a diffusers pipeline are on disk: a local folder, or a hub id found in the local
Hugging Face cache (offline: nothing is downloaded).

A pipeline folder, as ``pipeline.save_pretrained`` writes it, holds ``model_index.json`` (its
components: ``{"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_3": [null, null], ...}``)
and one subfolder per component: the denoiser (``unet/`` or ``transformer/``), ``scheduler/`` and,
when the model has them, ``vae/``, ``text_encoder*/`` and ``tokenizer*/``. A folder without
model_index.json (a pixel DDPM such as the CelebA-HQ layout: ``unet/`` and ``scheduler/``) is read
from the subfolders it has. A component model_index.json lists as null is absent, as diffusers
treats it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .load import ModelLoadError, is_hub_id

DENOISER_FOLDERS = ("unet", "transformer")  # in the order diffusers' pipelines name them
MODEL_INDEX = "model_index.json"
_TEXT_ENCODER = re.compile(r"text_encoder(_\d+)?")
_TOKENIZER = re.compile(r"tokenizer(_\d+)?")


@dataclass(frozen=True)
class PipelineFolder:
    """The folders of one pipeline's components.

    root: the pipeline folder; pipeline_class: model_index.json's ``_class_name`` (None without it);
    denoiser: the ``unet/`` or ``transformer/`` folder; scheduler, vae: their folders or None;
    text_encoders / tokenizers: {component name: folder}, e.g. {"text_encoder": ..., "text_encoder_2": ...};
    classes: {component name: class name} as model_index.json names them (empty without it).
    """

    root: str
    pipeline_class: Optional[str]
    denoiser: str
    scheduler: Optional[str]
    vae: Optional[str] = None
    text_encoders: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)


def resolve_model_path(name: str, cache_dir: Optional[str] = None) -> str:
    """The local folder ``name`` names: ``name`` itself when it is a folder, else the snapshot of the
    hub repo ``name`` (owner/name) in the local Hugging Face cache (``cache_dir``, default the
    hub's: ``HF_HUB_CACHE``). Never downloads: a repo not in the cache is a ``ModelLoadError`` that
    says how to download it."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ModelLoadError(f"{name!r} is a file; pass the pipeline folder (the one holding {MODEL_INDEX})")
    if not is_hub_id(name):
        raise FileNotFoundError(f"model {name!r} is neither an existing folder nor a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{name!r} is not a local folder and is not in the local Hugging Face cache; "
                             f"download it first (`hf download {name}`) or pass its folder") from None


def _read_index(root: str) -> Optional[dict]:
    path = os.path.join(root, MODEL_INDEX)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-export the pipeline with "
                             "save_pretrained(folder)") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(index).__name__}, not a pipeline index object")
    return index


def _components(root: str, index: Optional[dict]) -> dict:
    """{component name: class name or None} of the components present: model_index.json's non-null
    entries, else the subfolders there are (class unknown)."""
    if index is None:
        return {name: None for name in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, name))}
    present = {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
            present[name] = entry[1]
    return present


def find_components(root: str) -> PipelineFolder:
    """The components of the pipeline in folder ``root``.

    Raises ``ModelLoadError`` for a folder without a usable denoiser (neither ``unet/`` nor
    ``transformer/`` with a config.json), for a component model_index.json lists whose folder is
    missing, and for a pipeline (model_index.json) without ``scheduler/scheduler_config.json``:
    a default noise schedule in its place would silently change every result.
    """
    index = _read_index(root)
    present = _components(root, index)
    classes = {name: cls for name, cls in present.items() if cls is not None}

    def folder(name: str) -> str:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            raise ModelLoadError(f"{os.path.join(root, MODEL_INDEX)} lists the component {name!r} "
                                 f"({classes.get(name)}), but {path!r} is missing; copy the whole pipeline folder")
        return path

    denoisers = [name for name in DENOISER_FOLDERS if name in present]
    usable = [name for name in denoisers if os.path.isfile(os.path.join(root, name, "config.json"))]
    if not usable:
        found = "; ".join(f"{n}/ {'has no config.json' if os.path.isdir(os.path.join(root, n)) else 'is missing'}"
                          for n in denoisers) or "it has neither unet/ nor transformer/"
        raise ModelLoadError(f"{root!r} holds no usable denoiser ({found}): a pipeline folder needs unet/ or "
                             "transformer/ with config.json and diffusion_pytorch_model.safetensors, as "
                             "save_pretrained writes them")
    scheduler = os.path.join(root, "scheduler")
    if not os.path.isfile(os.path.join(scheduler, "scheduler_config.json")):
        if index is not None:
            raise ModelLoadError(f"{root!r} has no scheduler/scheduler_config.json: the pipeline's noise schedule "
                                 "is needed to noise images as the model was trained; copy the whole pipeline folder")
        scheduler = None
    return PipelineFolder(
        root=root, pipeline_class=index.get("_class_name") if index else None, denoiser=folder(usable[0]),
        scheduler=scheduler, vae=folder("vae") if "vae" in present else None,
        text_encoders={n: folder(n) for n in sorted(present) if _TEXT_ENCODER.fullmatch(n)},
        tokenizers={n: folder(n) for n in sorted(present) if _TOKENIZER.fullmatch(n)}, classes=classes)
