"""Matched-stimulus controls: images derived from a study's own images that take one property from a
reference set (the natural faces), so that a difference between two datasets can be split into
what that property explains and what it does not. Deterministic: no randomness, no downloads.

framing   ``FaceBox``: where the inner face (eyes and mouth) sits in the frame and how large it is.
          ``synthetic_face_box`` reads it from the generator's geometry, ``estimate_face_box`` from
          a set's mean image (aligned crops such as LFW's share one framing), ``reframe`` crops and
          resizes an image so that its box becomes a target box.
spectrum  ``radial_amplitude`` (radially averaged amplitude spectrum per channel),
          ``match_spectrum`` (each image's rings rescaled to a target, phases kept) and
          ``match_moments`` (per-channel mean and sd set to targets).

Images here are (N, C, S, S) float tensors in the items' range [-1, 1]; positions are fractions of
the frame side (0: left / top edge, 1: right / bottom edge; pixel i covers [i / S, (i + 1) / S]).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import face_landmarks


class FaceBox(NamedTuple):
    """The inner-face box of one face, in fractions of the frame side: x, y its centre (the point
    halfway between the eyes' midpoint and the mouth), width the distance between the eye centres,
    height the distance from the eyes' midpoint to the mouth. ``size`` = sqrt(width * height), the
    one scale a square crop can match."""

    x: float
    y: float
    width: float
    height: float

    @property
    def size(self) -> float:
        return float(np.sqrt(self.width * self.height))

    @classmethod
    def from_landmarks(cls, left_eye, right_eye, mouth) -> "FaceBox":
        """From (x, y) eye centres and mouth centre in frame fractions."""
        eyes = (np.asarray(left_eye, np.float64) + np.asarray(right_eye, np.float64)) / 2
        mouth = np.asarray(mouth, np.float64)
        centre = (eyes + mouth) / 2
        return cls(float(centre[0]), float(centre[1]), float(np.linalg.norm(np.subtract(right_eye, left_eye))),
                   float(np.linalg.norm(mouth - eyes)))


def synthetic_face_box(attrs: dict) -> FaceBox:
    """The box of a synthetic face from its attributes (``synthetic.face_landmarks``), exact at any
    resolution."""
    marks = {k: ((x + 1) / 2, (y + 1) / 2) for k, (x, y) in face_landmarks(attrs).items()}
    return FaceBox.from_landmarks(marks["left_eye"], marks["right_eye"], marks["mouth"])


def _gray(images: torch.Tensor) -> np.ndarray:
    """(N, C, S, S) -> (N, S, S) float64 luminance (BT.601 for 3 channels, the mean otherwise)."""
    x = images.double()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1)
    else:
        x = x.mean(1)
    return x.numpy()


def _refine(values: np.ndarray, r: int, c: int) -> tuple:
    """Sub-pixel position of the dark spot at (r, c): the darkness-weighted centroid of its 3 x 3
    neighbourhood (weight = the neighbourhood's brightest value minus each value)."""
    r0, r1 = max(r - 1, 0), min(r + 2, values.shape[0])
    c0, c1 = max(c - 1, 0), min(c + 2, values.shape[1])
    patch = values[r0:r1, c0:c1]
    w = patch.max() - patch
    if w.sum() <= 0:
        return r + 0.5, c + 0.5
    rr, cc = np.mgrid[r0:r1, c0:c1]
    return float((w * (rr + 0.5)).sum() / w.sum()), float((w * (cc + 0.5)).sum() / w.sum())


# Search windows of ``estimate_face_box`` in frame fractions (rows, columns): an aligned, upright,
# frontal face crop has its eyes in the upper middle left and right of the vertical midline, and its
# mouth below them between the eyes.
EYE_ROWS = (0.2, 0.55)
EYE_COLUMNS = ((0.15, 0.5), (0.5, 0.85))
MOUTH_BELOW_EYES = 0.15  # the mouth is searched from this far below the eyes to the bottom edge


def estimate_face_box(images: torch.Tensor) -> FaceBox:
    """The face box of a set of aligned face crops (N, C, S, S), from its mean image. Features are
    dark blobs against the skin, so the image searched is the mean's local darkness contrast (a
    difference of Gaussians, sd S/32 minus sd S/8: a dark background at the frame's edge is a step,
    not a blob), less its column means (hair or background beside the face is a dark vertical band,
    dark in every row; an eye is not). The eyes are its darkest spots (sub-pixel refined) in the left and right
    ``EYE_COLUMNS`` of ``EYE_ROWS``; the mouth is the darkest row (parabola-refined) of the band
    between the eyes' columns from ``MOUTH_BELOW_EYES`` below them, on the eyes' midline. One box
    for the set: the crops are aligned, so their mean keeps the features sharp where single
    low-resolution crops are noisy."""
    from scipy.ndimage import gaussian_filter

    mean = _gray(images).mean(0)
    s = mean.shape[0]
    smooth = gaussian_filter(mean, sigma=s / 32, mode="nearest") - gaussian_filter(mean, sigma=s / 8, mode="nearest")
    smooth = smooth - smooth.mean(axis=0, keepdims=True)
    r0, r1 = (int(round(f * s)) for f in EYE_ROWS)
    eyes = []
    for lo, hi in EYE_COLUMNS:
        c0, c1 = int(round(lo * s)), int(round(hi * s))
        window = smooth[r0:r1, c0:c1]
        r, c = np.unravel_index(int(np.argmin(window)), window.shape)
        y, x = _refine(smooth, r0 + int(r), c0 + int(c))
        eyes.append((x / s, y / s))
    eye_y = (eyes[0][1] + eyes[1][1]) / 2
    m0 = int(np.ceil((eye_y + MOUTH_BELOW_EYES) * s))
    c0, c1 = int(round(eyes[0][0] * s)), int(round(eyes[1][0] * s)) + 1
    profile = smooth[m0:, c0:c1].mean(1)
    k = int(np.argmin(profile))
    offset = 0.0
    if 0 < k < len(profile) - 1:  # the vertex of the parabola through the minimum and its neighbours
        a, b, c = profile[k - 1], profile[k], profile[k + 1]
        if a - 2 * b + c > 0:
            offset = 0.5 * (a - c) / (a - 2 * b + c)
    mouth = ((eyes[0][0] + eyes[1][0]) / 2, (m0 + k + offset + 0.5) / s)
    return FaceBox.from_landmarks(eyes[0], eyes[1], mouth)


def crop_for(box: FaceBox, target: FaceBox) -> tuple:
    """(left, top, side) in frame fractions of the square crop that carries ``box`` to ``target``:
    scaled by target.size / box.size, its centre moved to (target.x, target.y)."""
    side = box.size / target.size
    return box.x - target.x * side, box.y - target.y * side, side


def reframe(images: torch.Tensor, labels: torch.Tensor, boxes: list, target: FaceBox) -> tuple:
    """Crop and resize each image so that its face box becomes ``target`` (``crop_for``).

    images (N, C, S, S) in [-1, 1], labels (N, S, S) integer maps, boxes: N FaceBoxes. Returns
    (images (N, C, S, S) bicubic and clamped to [-1, 1], labels (N, S, S) nearest). Pixels a crop
    takes from beyond the frame repeat the edge (border padding). The crops here enlarge (a face box
    smaller than the target's), so no anti-aliasing is needed; a crop larger than the frame
    samples it without one."""
    n, _, s, _ = images.shape
    u = (torch.arange(s, dtype=torch.float64) + 0.5) / s  # output pixel centres
    grids = []
    for box in boxes:
        left, top, side = crop_for(box, target)
        gx, gy = 2 * (left + u * side) - 1, 2 * (top + u * side) - 1  # grid_sample's [-1, 1] (align_corners False)
        grids.append(torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1))
    grid = torch.stack(grids).to(images.dtype)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(-1, 1)
    lab = F.grid_sample(labels[:, None].double(), grid.double(), mode="nearest", padding_mode="border",
                        align_corners=False)[:, 0].round().to(labels.dtype)
    return out, lab


def radial_bins(size: int) -> torch.Tensor:
    """(S, S) int64 ring index of each 2-D FFT coefficient: its integer frequency radius, rounded."""
    k = torch.fft.fftfreq(size, d=1.0 / size).double()
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long()


def radial_amplitude(images: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) -> (N, C, R) float64: the mean |FFT| over each ring of ``radial_bins`` (ring 0
    is the mean's coefficient alone)."""
    bins = radial_bins(images.shape[-1]).reshape(-1)
    amp = torch.fft.fft2(images.double()).abs().flatten(2)  # (N, C, S*S)
    n_rings = int(bins.max()) + 1
    sums = torch.zeros(*amp.shape[:2], n_rings, dtype=torch.float64).index_add_(2, bins, amp)
    return sums / torch.bincount(bins, minlength=n_rings).double()


def match_spectrum(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each image's radially averaged amplitude spectrum set to ``target`` (C, R), phases kept:
    every coefficient of ring r of channel c is multiplied by target[c, r] / (the image's own ring
    mean), which keeps the spectrum Hermitian (a ring holds k and -k), so the result is real.
    A ring the image has no amplitude in stays zero (it has no phase to keep). Returns (N, C, S, S)
    float64, not clipped to any range."""
    bins = radial_bins(images.shape[-1])
    spectrum = torch.fft.fft2(images.double())
    own = radial_amplitude(images)
    with torch.no_grad():
        factor = torch.where(own > 0, target.double()[None] / own.clamp_min(1e-300), torch.zeros_like(own))
    return torch.fft.ifft2(spectrum * factor[..., bins]).real


def match_moments(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel mean and sd (population) set to ``mean`` and ``std`` (C,); a
    constant channel becomes the target mean. Returns (N, C, S, S) float64."""
    x = images.double()
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True, correction=0)
    z = torch.where(sd > 0, (x - mu) / sd.clamp_min(1e-300), torch.zeros_like(x))
    return z * std.double().view(1, -1, 1, 1) + mean.double().view(1, -1, 1, 1)


def channel_moments(images: torch.Tensor) -> tuple:
    """((C,), (C,)) float64: the mean over images of each channel's mean, and of its sd."""
    x = images.double()
    return x.mean(dim=(2, 3)).mean(0), x.std(dim=(2, 3), correction=0).mean(0)


__all__ = ["FaceBox", "channel_moments", "crop_for", "estimate_face_box", "match_moments", "match_spectrum",
           "radial_amplitude", "radial_bins", "reframe", "synthetic_face_box"]
