"""Offline natural images that ship inside scikit-image: ``LFWFaces`` and ``NaturalPhotos``.

Nothing here downloads: only files in scikit-image's own ``skimage/data`` folder are used.
Label maps are SLIC superpixels (``items.slic_labels``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from .items import make_item, resize, slic_labels, to_rgb01
from .splits import lfw_split_indices

# Sample photographs used for NaturalPhotos. Left out on purpose: astronaut and camera (they show
# human faces), text/page (documents), and the files scikit-image fetches from the network.
PHOTOS = ("coffee", "chelsea", "rocket", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "grass", "gravel", "brick")


@functools.lru_cache(maxsize=1)
def _lfw_faces() -> np.ndarray:
    """(100, 25, 25) uint8: the face half of skimage.data.lfw_subset() (its last 100 are non-faces)."""
    from skimage import data

    return np.round(data.lfw_subset()[:100] * 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)()))


class LFWFaces(torch.utils.data.Dataset):
    """The 100 aligned 25x25 grayscale LFW face crops of ``skimage.data.lfw_subset()``, resized to
    ``size`` (bicubic) and repeated to 3 channels.

    split: "train" (80 faces) or "heldout" (20 faces); the fixed split is in ``splits.py``.
    flip: append horizontally mirrored copies (items len/2 .. len-1); allowed for "train" only
    (the default there), marked by ``attributes["flipped"]`` and a ":flip" suffix of ``source``.
    """

    def __init__(self, split: str = "heldout", size: int = 32, flip: bool | None = None):
        self.indices = lfw_split_indices(split)
        if flip is None:
            flip = split == "train"
        if flip and split != "train":
            raise ValueError("horizontal-flip augmentation is for the LFW train split only; held-out images stay as they are")
        self.split, self.size, self.flip = split, int(size), bool(flip)
        faces = _lfw_faces()
        self._images = [to_rgb01(resize(Image.fromarray(faces[k]), self.size)) for k in self.indices]
        self._labels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.indices) * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} LFW items")
        j, flipped = i % len(self.indices), i >= len(self.indices)
        image = self._images[j][:, ::-1] if flipped else self._images[j]
        if i not in self._labels:
            self._labels[i] = slic_labels(image)
        k = self.indices[j]
        attrs = {"dataset": "lfw", "split": self.split, "lfw_index": k, "flipped": flipped}
        return make_item(image, self._labels[i], attrs, f"lfw:{k}" + (":flip" if flipped else ""))


class NaturalPhotos(torch.utils.data.Dataset):
    """``n`` square crops of scikit-image's sample photographs (``PHOTOS``), non-face natural images.

    Crop i is drawn from ``default_rng(seed + i)``: a photo, a side of 25-60 % of the photo's shorter
    side, and a position; then resized to ``size``. Grayscale photos are repeated to 3 channels.
    """

    def __init__(self, n: int = 100, size: int = 32, seed: int = 0, photos: tuple[str, ...] = PHOTOS):
        self.n, self.size, self.seed, self.photos = int(n), int(size), int(seed), tuple(photos)

    def __len__(self) -> int:
        return self.n

    def crop_box(self, i: int) -> tuple[str, tuple[int, int, int, int]]:
        """(photo name, (left, top, right, bottom)) of item i."""
        rng = np.random.default_rng(self.seed + i)
        name = self.photos[int(rng.integers(len(self.photos)))]
        w, h = _photo(name).size
        side = int(round(rng.uniform(0.25, 0.6) * min(w, h)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        return name, (left, top, left + side, top + side)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} photo crops")
        name, box = self.crop_box(i)
        image = to_rgb01(resize(_photo(name).crop(box), self.size))
        attrs = {"dataset": "photos", "photo": name, "crop_left": box[0], "crop_top": box[1], "crop_side": box[2] - box[0]}
        return make_item(image, slic_labels(image), attrs, f"photos:{name}:{box[0]},{box[1]},{box[2] - box[0]}")
