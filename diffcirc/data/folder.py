"""``ImageFolder``: every image under a folder (recursively), centre-cropped square and resized."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from .items import center_square, make_item, resize, slic_labels, to_rgb01

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _decodes(path: str, size: int) -> bool:
    """Whether PIL can fully decode ``path``. JPEGs decode at reduced scale (draft) to keep this cheap."""
    try:
        with Image.open(path) as pil:
            pil.draft("RGB", (size, size))
            pil.load()
        return True
    except Exception:  # any decoder error means "unreadable": PIL raises many types
        return False


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` (recursive, sorted paths, extensions in ``EXTENSIONS``).

    Every file is decoded once when the dataset is built; files that cannot be read are skipped with
    one warning and counted in ``self.skipped`` (their paths in ``self.skipped_files``), so iteration
    never fails on a corrupt file. n/seed pick a random subset as in ``CelebA``. Labels: SLIC.
    """

    def __init__(self, root: str, size: int = 64, n: int | None = None, seed: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root, self.size = root, int(size)
        paths = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(EXTENSIONS)
        )
        good = [p for p in paths if _decodes(p, self.size)]
        self.skipped_files = sorted(set(paths) - set(good))
        self.skipped = len(self.skipped_files)
        if self.skipped:
            warnings.warn(f"ImageFolder({root!r}): skipped {self.skipped} unreadable file(s), e.g. "
                          f"{self.skipped_files[0]!r}", stacklevel=2)
        if n is not None and n < len(good):
            pick = np.random.default_rng(seed).permutation(len(good))[:n]
            good = [good[k] for k in sorted(pick)]
        self.files = good

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        with Image.open(path) as pil:
            image = to_rgb01(resize(center_square(pil.convert("RGB")), self.size))
        rel = os.path.relpath(path, self.root)
        return make_item(image, slic_labels(image), {"dataset": "folder", "file": rel}, f"folder:{rel}")
