"""``CelebA``: the aligned-and-cropped CelebA images in the official layout.

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt        (count line, header of 40 names, then "file  ±1 x 40")
    ROOT/list_eval_partition.txt     ("file 0|1|2": train / valid / test)

``ROOT`` may also be torchvision's root, which holds these under ``celeba/``. Nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .folder import read_image
from .items import DatasetError, decodes, make_item, resize, slic_labels, to_rgb01

SPLITS = {"train": 0, "valid": 1, "test": 2}
# The usual CelebA 64x64 preprocessing: the central 140x140 of the 178x218 aligned image.
CROP = 140


def find_root(root: str) -> str:
    """The folder that holds img_align_celeba/ (``root`` itself or ``root/celeba``)."""
    for cand in (root, os.path.join(root, "celeba")):
        if os.path.isdir(os.path.join(cand, "img_align_celeba")):
            return cand
    raise FileNotFoundError(f"no img_align_celeba/ under {root!r} or {os.path.join(root, 'celeba')!r}")


def _lines(path: str) -> list[str]:
    """The lines of a CelebA index file, with a message that says which file is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CelebA index file {path!r} is missing; it comes with the CelebA download")
    with open(path, errors="replace") as f:  # a binary file then fails the format checks, not the decoder
        return f.read().splitlines()


def read_attributes(path: str) -> tuple[list[str], dict[str, dict[str, bool]]]:
    """Parse list_attr_celeba.txt -> (attribute names, {filename: {name: bool}})."""
    lines = _lines(path)
    names = lines[1].split() if len(lines) > 1 else []
    if not names:
        raise DatasetError(f"{path!r} is not a CelebA attribute file: expected a count line, then a line of "
                           "attribute names, then one line per image")
    table = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DatasetError(f"{path!r} line {number}: expected a file name and {len(names)} values of 1 or -1, "
                               f"got {line[:80]!r}")
        table[parts[0]] = {n: v == "1" for n, v in zip(names, parts[1:])}
    return names, table


def read_partition(path: str) -> dict[str, int]:
    """Parse list_eval_partition.txt -> {filename: 0 (train) | 1 (valid) | 2 (test)}."""
    partition = {}
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path!r} line {number}: expected 'FILE 0|1|2', got {line[:80]!r}")
        partition[parts[0]] = int(parts[1])
    return partition


class CelebA(torch.utils.data.Dataset):
    """CelebA faces, centre-cropped to 140x140 and resized to ``size``.

    split: "train", "valid", "test" or "all". attributes: keep images whose attributes match, e.g.
    ``{"Male": False, "Eyeglasses": False}``. n: keep n of the matching images, chosen by a
    permutation from ``default_rng(seed)`` and then sorted by file name (None: all).
    Labels are SLIC superpixels.

    Unreadable files, as in ``ImageFolder``: listed files that are missing on disk or cannot be
    decoded (corrupt, truncated, empty, not an image) are skipped with one warning that counts
    them; ``self.skipped`` holds the count and ``self.skipped_files`` the names. Only the files
    the dataset keeps are decoded, and a skipped file is replaced by the next one of the ``seed``
    permutation, so ``n`` is still honoured. No usable image at all raises ``DatasetError``.
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
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 (or None for every image), got {n}")
        if not files:
            raise DatasetError(f"no CelebA image in {self.root!r} matches split={split!r}, attributes={attributes}")
        self.files, self.skipped_files = self._usable(files, n, seed)
        self.skipped = len(self.skipped_files)
        self._table, self._part = table, part

    def _usable(self, files: list[str], n: int | None, seed: int) -> tuple[list[str], list[str]]:
        """(kept files sorted, skipped files sorted): the first n readable files in the order of the
        seed's permutation (all files, in order, when n is None)."""
        if n is None or n >= len(files):
            order = range(len(files))
        else:
            order = np.random.default_rng(seed).permutation(len(files))
        kept, skipped = [], []
        for k in order:
            if n is not None and len(kept) == n:
                break
            path = os.path.join(self.root, "img_align_celeba", files[k])
            (kept if os.path.isfile(path) and decodes(path, self.size) else skipped).append(files[k])
        if not kept:
            folder = os.path.join(self.root, "img_align_celeba")
            raise DatasetError(f"none of the {len(skipped)} selected CelebA images in {folder!r} exists or can be "
                               f"read, e.g. {skipped[0]!r}")
        if skipped:
            warnings.warn(f"CelebA({self.root!r}): skipped {len(skipped)} missing or unreadable file(s), e.g. "
                          f"{skipped[0]!r}", stacklevel=3)
        return sorted(kept), sorted(skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        name = self.files[i]
        pil = read_image(os.path.join(self.root, "img_align_celeba", name))
        w, h = pil.size
        left, top = (w - CROP) // 2, (h - CROP) // 2
        image = to_rgb01(resize(pil.crop((left, top, left + CROP, top + CROP)), self.size))
        attrs = {"dataset": "celeba", "file": name, "partition": self._part.get(name, -1), **self._table[name]}
        return make_item(image, slic_labels(image), attrs, f"celeba:{name}")
