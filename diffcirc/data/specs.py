"""Dataset specs: the short strings the CLIs use to name a dataset.

    synthetic          SyntheticFaces, colour          synthetic-gray   SyntheticFaces(grayscale=True)
    lfw                LFWFaces of ``split``           lfw-train / lfw-heldout   LFWFaces of that split
    photos             NaturalPhotos                   celeba:PATH      CelebA under PATH
    folder:PATH        ImageFolder under PATH

A training mix is a comma-separated list of specs, each optionally followed by ``:COUNT`` (how many
items of that spec one pass over the mix holds; smaller finite sets are repeated to reach it):
``synthetic:3000,synthetic-gray:3000,lfw-train:1500``.
"""

from __future__ import annotations

import re

import torch

from .celeba import CelebA
from .faces import SyntheticFaces
from .folder import ImageFolder
from .skimage_sets import LFWFaces, NaturalPhotos
from .splits import TRAIN_SEED_COUNT, synthetic_seed_base

DEFAULT_N = 1000  # items of the generated sets (synthetic, photos) when n is not given
_CELEBA_SPLIT = {"train": "train", "valid": "valid", "test": "test", "heldout": "test", "all": "all"}


def load_dataset(spec: str, size: int = 32, n: int | None = None, seed: int = 0, split: str = "heldout"):
    """Build the dataset a spec names.

    split: "heldout" (default: safe for analysis) or "train"; for synthetic faces it picks the seed
    range (item i has seed ``base(split) + seed + i``), for LFW the index split, for CelebA the
    partition ("heldout" means CelebA's "test"; "valid" and "all" also work). n: number of items
    (generated sets: default DEFAULT_N; finite sets: the first n, or all when None).
    """
    kind, _, arg = spec.partition(":")
    if kind in ("synthetic", "synthetic-gray"):
        n = DEFAULT_N if n is None else int(n)
        if split == "train" and seed + n > TRAIN_SEED_COUNT:
            raise ValueError(f"training synthetic seeds must stay below {TRAIN_SEED_COUNT}, got seed {seed} + n {n}")
        return SyntheticFaces(n=n, size=size, seed=synthetic_seed_base(split) + seed, grayscale=kind == "synthetic-gray")
    if kind in ("lfw", "lfw-train", "lfw-heldout"):
        lfw_split = kind[4:] if kind != "lfw" else ("train" if split == "train" else "heldout")
        return _first(LFWFaces(split=lfw_split, size=size), n)
    if kind == "photos":
        return NaturalPhotos(n=DEFAULT_N if n is None else int(n), size=size, seed=seed)
    if kind == "celeba" and arg:
        if split not in _CELEBA_SPLIT:
            raise ValueError(f"CelebA split must be one of {list(_CELEBA_SPLIT)}, got {split!r}")
        return CelebA(arg, size=size, split=_CELEBA_SPLIT[split], n=n, seed=seed)
    if kind == "folder" and arg:
        return ImageFolder(arg, size=size, n=n, seed=seed)
    raise ValueError(f"unknown dataset spec {spec!r}; expected one of synthetic, synthetic-gray, lfw, "
                     "lfw-train, lfw-heldout, photos, celeba:PATH, folder:PATH")


def parse_mix(mix: str) -> list[tuple[str, int | None]]:
    """``"synthetic:3000,lfw-train"`` -> ``[("synthetic", 3000), ("lfw-train", None)]``."""
    out = []
    for part in (p.strip() for p in mix.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(.+):(\d+)", part)
        out.append((m.group(1), int(m.group(2))) if m else (part, None))
    if not out:
        raise ValueError(f"empty dataset mix {mix!r}")
    return out


def _first(dataset, n):
    return dataset if n is None or n >= len(dataset) else torch.utils.data.Subset(dataset, range(int(n)))
