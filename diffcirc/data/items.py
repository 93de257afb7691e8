"""The item format every dataset yields, the collate function, and shared image helpers.

An item is a dict:
    image       (3, S, S) float32 in [-1, 1]
    labels      (S, S) int64: part ids (synthetic faces) or SLIC superpixel ids (natural images)
    attributes  dict of str/int/float/bool
    source      str, a stable id of the image (e.g. "synthetic:10000003", "lfw:42:flip")
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

# SLIC settings for natural images: about as many regions as the synthetic faces have parts, so the
# same-region statistics are on a comparable footing on both datasets.
SLIC_SEGMENTS = 12
SLIC_COMPACTNESS = 10.0  # colour: slic works in Lab (L in 0..100)
SLIC_COMPACTNESS_GRAY = 0.3  # gray in [0, 1]; smaller values let texture (gravel, brick) fragment the regions


def make_item(image: np.ndarray, labels: np.ndarray, attributes: dict, source: str) -> dict:
    """image: (S, S, 3) float in [0, 1]; labels: (S, S) int. Returns the item dict described above."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    return {
        "image": (img * 2.0 - 1.0).contiguous(),
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        "attributes": dict(attributes),
        "source": str(source),
    }


def collate(items: list[dict]) -> dict:
    """Batch items for a DataLoader: image (B, 3, S, S), labels (B, S, S), attributes and source as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "attributes": [it["attributes"] for it in items],
        "source": [it["source"] for it in items],
    }


class DatasetError(InputError):
    """A dataset that cannot be used as it is (no usable images, a malformed index file); the message
    names the folder or file and says what is wrong."""


def decodes(path: str, size: int) -> bool:
    """Whether PIL can fully decode ``path``. JPEGs decode at reduced scale (draft) to keep this cheap;
    a truncated JPEG still fails, since every scale reads all of the compressed data."""
    try:
        with Image.open(path) as pil:
            pil.draft("RGB", (size, size))
            pil.load()
        return True
    except Exception:  # any decoder error means "unreadable": PIL raises many types
        return False


def to_rgb8(pil: Image.Image) -> Image.Image:
    """PIL image of any mode -> 8-bit RGB.

    16-bit grayscale (modes I;16* and I) is scaled by 1/257: PIL's own conversion to RGB clips such
    values at 255, which would silently turn most of a 16-bit image white.
    """
    if pil.mode == "I" or pil.mode.startswith("I;16"):
        gray = np.clip(np.round(np.asarray(pil, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return pil.convert("RGB")


def to_rgb01(pil: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) float32 in [0, 1] (grayscale repeated to 3 channels)."""
    return np.asarray(to_rgb8(pil), dtype=np.float32) / 255.0


def center_square(pil: Image.Image) -> Image.Image:
    """The largest centred square crop."""
    w, h = pil.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return pil.crop((left, top, left + s, top + s))


def resize(pil: Image.Image, size: int) -> Image.Image:
    """Resize to (size, size) with bicubic filtering (PIL widens the kernel when shrinking: anti-aliased)."""
    if pil.size == (size, size):
        return pil
    return pil.resize((size, size), Image.BICUBIC)


def slic_labels(image: np.ndarray, n_segments: int = SLIC_SEGMENTS) -> np.ndarray:
    """SLIC superpixels of an (S, S, 3) float image in [0, 1] -> (S, S) int64 region ids from 1.

    Ids start at 1 so that 0 never looks like the synthetic "background" part. Gray images
    (equal channels) are segmented as single-channel images.
    """
    from skimage.segmentation import slic

    gray = np.allclose(image[..., 0], image[..., 1]) and np.allclose(image[..., 0], image[..., 2])
    if gray:
        seg = slic(image[..., 0].astype(np.float64), n_segments=n_segments, compactness=SLIC_COMPACTNESS_GRAY,
                   channel_axis=None, start_label=1)
    else:
        seg = slic(image.astype(np.float64), n_segments=n_segments, compactness=SLIC_COMPACTNESS,
                   channel_axis=-1, start_label=1)
    return seg.astype(np.int64)
