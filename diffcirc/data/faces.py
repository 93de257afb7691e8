"""``SyntheticFaces``: the procedural faces of ``synthetic.py`` as a map-style Dataset, and the
folder export behind ``diffcirc faces``."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch
from PIL import Image

from ..files import atomic_path, write_image
from .items import make_item
from .splits import HELDOUT_SEED_BASE
from .synthetic import generate


class SyntheticFaces(torch.utils.data.Dataset):
    """``n`` procedural faces; item i is generated from seed ``seed + i`` alone (recomputable).

    The default ``seed`` is the start of the held-out range, so a dataset built without arguments is
    safe for analysis; training passes a seed from the training range (see ``splits.py``).
    Items: image (3, size, size) float32 in [-1, 1], labels (size, size) int64 part ids.
    """

    def __init__(self, n: int = 1000, size: int = 64, seed: int = HELDOUT_SEED_BASE, grayscale: bool = False):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.size, self.seed, self.grayscale = int(n), int(size), int(seed), bool(grayscale)
        self.name = "synthetic-gray" if grayscale else "synthetic"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} faces")
        seed = self.seed + (i % self.n)
        image, labels, attrs = generate(seed, self.size, grayscale=self.grayscale)
        return make_item(image, labels, {"dataset": self.name, **attrs}, f"{self.name}:{seed}")


def export_faces(out: str, n: int, size: int = 64, seed: int = 0, grayscale: bool = False) -> str:
    """Write ``n`` faces to ``out``: images/{seed}.png, labels/{seed}.png (uint8 part ids) and
    attributes.csv (one row per face, columns = attribute names plus ``image`` and ``labels`` paths).
    Returns the CSV path."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    rows = []
    for s in range(seed, seed + n):
        image, labels, attrs = generate(s, size, grayscale=grayscale)
        img_rel, lab_rel = os.path.join("images", f"{s}.png"), os.path.join("labels", f"{s}.png")
        write_image(Image.fromarray(np.round(image * 255).astype(np.uint8)), os.path.join(out, img_rel))
        write_image(Image.fromarray(labels.astype(np.uint8)), os.path.join(out, lab_rel))
        rows.append({"image": img_rel, "labels": lab_rel, **attrs})
    path = os.path.join(out, "attributes.csv")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return path
