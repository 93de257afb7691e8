"""``ImageFolder``: every image under a folder (recursively), centre-cropped square and resized."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from .items import DatasetError, center_square, decodes, make_item, resize, slic_labels, to_rgb01, to_rgb8

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, or a DatasetError naming the file (e.g. it changed after
    the dataset checked it). Used by ``__getitem__``, where a bare PIL error would not say which file."""
    try:
        with Image.open(path) as pil:
            return to_rgb8(pil)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all three
        raise DatasetError(f"cannot read image {path!r} ({type(e).__name__}: {e}); it was readable when the "
                           "dataset was built: replace or remove the file and build the dataset again") from e


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` (recursive, sorted paths, extensions in ``EXTENSIONS``).

    Unreadable files (corrupt, truncated, empty, or not an image despite the extension): every file
    is decoded once when the dataset is built, and those that cannot be read are skipped with one
    warning that counts them; ``self.skipped`` holds the count and ``self.skipped_files`` the paths.
    So iteration never fails on a corrupt file, and no item is silently substituted.
    A folder with no readable image raises ``DatasetError`` (a missing folder: FileNotFoundError).
    n/seed pick a random subset of the readable images as in ``CelebA``. Labels: SLIC.
    """

    def __init__(self, root: str, size: int = 64, n: int | None = None, seed: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 (or None for every image), got {n}")
        self.root, self.size = root, int(size)
        paths = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(EXTENSIONS)
        )
        if not paths:
            raise DatasetError(f"image folder {root!r} holds no images (no files ending in {', '.join(EXTENSIONS)})")
        good = [p for p in paths if decodes(p, self.size)]
        self.skipped_files = sorted(set(paths) - set(good))
        self.skipped = len(self.skipped_files)
        if not good:
            raise DatasetError(f"none of the {len(paths)} image files under {root!r} can be read (corrupt, truncated "
                               f"or not images), e.g. {self.skipped_files[0]!r}")
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
        image = to_rgb01(resize(center_square(read_image(path)), self.size))
        rel = os.path.relpath(path, self.root)
        return make_item(image, slic_labels(image), {"dataset": "folder", "file": rel}, f"folder:{rel}")
