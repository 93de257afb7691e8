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


_PLAIN = ("synthetic", "synthetic-gray", "lfw", "lfw-train", "lfw-heldout", "photos")  # take no argument
_WITH_PATH = ("celeba", "folder")  # take ":PATH"


def check_spec(spec: str) -> str:
    """``spec`` if it names a dataset that can be built, without building it (cheap: for up-front checks).

    Raises ValueError for an unknown kind, a missing or stray argument, and FileNotFoundError for a
    celeba:/folder: path that is not a folder. Whether the folder holds usable images is only known
    when the dataset is built (``DatasetError``).
    """
    import os

    kind, colon, arg = spec.partition(":")
    if kind in _PLAIN and colon:
        raise ValueError(f"dataset spec {spec!r}: {kind} takes no ':' argument (in a training mix a count "
                         f"goes last, e.g. {kind}:1000; elsewhere the number of images has its own option)")
    if kind in _WITH_PATH and arg and not os.path.isdir(arg):
        raise FileNotFoundError(f"dataset spec {spec!r}: folder {arg!r} does not exist or is not a folder")
    if kind not in _PLAIN and not (kind in _WITH_PATH and arg):
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of synthetic, synthetic-gray, lfw, "
                         "lfw-train, lfw-heldout, photos, celeba:PATH, folder:PATH")
    return spec


def load_dataset(spec: str, size: int = 32, n: int | None = None, seed: int = 0, split: str = "heldout"):
    """Build the dataset a spec names.

    split: "heldout" (default: safe for analysis) or "train"; for synthetic faces it picks the seed
    range (item i has seed ``base(split) + seed + i``), for LFW the index split, for CelebA the
    partition ("heldout" means CelebA's "test"; "valid" and "all" also work). n: number of items
    (generated sets: default DEFAULT_N; finite sets: the first n, or all when None).
    """
    check_spec(spec)
    if n is not None and int(n) < 1:
        raise ValueError(f"n must be >= 1 (or None for the default), got {n}")
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
    if kind == "celeba":  # check_spec has made sure a path follows
        if split not in _CELEBA_SPLIT:
            raise ValueError(f"CelebA split must be one of {list(_CELEBA_SPLIT)}, got {split!r}")
        return CelebA(arg, size=size, split=_CELEBA_SPLIT[split], n=n, seed=seed)
    return ImageFolder(arg, size=size, n=n, seed=seed)  # kind == "folder": the last kind check_spec lets through


def parse_mix(mix: str) -> list[tuple[str, int | None]]:
    """``"synthetic:3000,lfw-train"`` -> ``[("synthetic", 3000), ("lfw-train", None)]``.

    A COUNT must be >= 1: a component drawn zero times would contribute nothing (or, for a
    generated set, no images at all). Specs are not checked here; see ``check_spec``.
    """
    out = []
    for part in (p.strip() for p in mix.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(.+):(-?\d+)", part)
        if m and int(m.group(2)) < 1:
            raise ValueError(f"dataset mix {mix!r}: the count of {m.group(1)!r} must be >= 1, got {m.group(2)}")
        out.append((m.group(1), int(m.group(2))) if m else (part, None))
    if not out:
        raise ValueError(f"empty dataset mix {mix!r}")
    return out


def _first(dataset, n):
    return dataset if n is None or n >= len(dataset) else torch.utils.data.Subset(dataset, range(int(n)))
