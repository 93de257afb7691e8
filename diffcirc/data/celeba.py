"""``CelebA``: the aligned-and-cropped CelebA images in the official layout.

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt        (count line, header of 40 names, then "file  ±1 x 40")
    ROOT/list_eval_partition.txt     ("file 0|1|2": train / valid / test)

``ROOT`` may also be torchvision's root, which holds these under ``celeba/``. Nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .items import make_item, resize, slic_labels, to_rgb01

SPLITS = {"train": 0, "valid": 1, "test": 2}
# The usual CelebA 64x64 preprocessing: the central 140x140 of the 178x218 aligned image.
CROP = 140


def find_root(root: str) -> str:
    """The folder that holds img_align_celeba/ (``root`` itself or ``root/celeba``)."""
    for cand in (root, os.path.join(root, "celeba")):
        if os.path.isdir(os.path.join(cand, "img_align_celeba")):
            return cand
    raise FileNotFoundError(f"no img_align_celeba/ under {root!r} or {os.path.join(root, 'celeba')!r}")


def read_attributes(path: str) -> tuple[list[str], dict[str, dict[str, bool]]]:
    """Parse list_attr_celeba.txt -> (attribute names, {filename: {name: bool}})."""
    with open(path) as f:
        lines = f.read().splitlines()
    names = lines[1].split()
    table = {}
    for line in lines[2:]:
        parts = line.split()
        if parts:
            table[parts[0]] = {n: v == "1" for n, v in zip(names, parts[1:])}
    return names, table


def read_partition(path: str) -> dict[str, int]:
    with open(path) as f:
        return {p[0]: int(p[1]) for p in (line.split() for line in f) if len(p) == 2}


class CelebA(torch.utils.data.Dataset):
    """CelebA faces, centre-cropped to 140x140 and resized to ``size``.

    split: "train", "valid", "test" or "all". attributes: keep images whose attributes match, e.g.
    ``{"Male": False, "Eyeglasses": False}``. n: keep n of the matching images, chosen by a
    permutation from ``default_rng(seed)`` and then sorted by file name (None: all).
    Labels are SLIC superpixels. Files listed but missing on disk are dropped (counted in ``skipped``).
    """

    def __init__(self, root: str, size: int = 64, split: str = "all", attributes: dict | None = None,
                 n: int | None = None, seed: int = 0):
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {[*SPLITS, 'all']}, got {split!r}")
        self.root, self.size, self.split = find_root(root), int(size), split
        self.names, table = read_attributes(os.path.join(self.root, "list_attr_celeba.txt"))
        unknown = set(attributes or {}) - set(self.names)
        if unknown:
            raise ValueError(f"unknown CelebA attributes {sorted(unknown)}; known: {self.names}")
        part = read_partition(os.path.join(self.root, "list_eval_partition.txt"))
        files = sorted(table)
        if split != "all":
            files = [f for f in files if part.get(f) == SPLITS[split]]
        for key, want in (attributes or {}).items():
            files = [f for f in files if table[f][key] == bool(want)]
        present = [f for f in files if os.path.isfile(os.path.join(self.root, "img_align_celeba", f))]
        self.skipped = len(files) - len(present)
        if n is not None and n < len(present):
            pick = np.random.default_rng(seed).permutation(len(present))[:n]
            present = [present[k] for k in sorted(pick)]
        self.files, self._table, self._part = present, table, part

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        name = self.files[i]
        with Image.open(os.path.join(self.root, "img_align_celeba", name)) as pil:
            w, h = pil.size
            left, top = (w - CROP) // 2, (h - CROP) // 2
            image = to_rgb01(resize(pil.convert("RGB").crop((left, top, left + CROP, top + CROP)), self.size))
        attrs = {"dataset": "celeba", "file": name, "partition": self._part.get(name, -1), **self._table[name]}
        return make_item(image, slic_labels(image), attrs, f"celeba:{name}")
