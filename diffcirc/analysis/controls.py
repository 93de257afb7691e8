"""The matched-stimulus control sets of a run: which controls a configuration can have, and each
set's images built from the study's own images (the image operations are ``data.controls``).

    framing   the first n synthetic faces, each cropped and resized so that its inner-face box (eye
              centres and mouth, ``FaceBox``; read from the generator's geometry) takes the natural
              set's box (estimated from the natural images' mean: aligned face crops share one
              framing). Labels are cropped with them.
    spectrum  the first n synthetic faces, each channel's radially averaged amplitude spectrum set
              to the natural images' mean one (phases kept), then each channel's mean and sd set to
              the natural images' mean ones. Labels unchanged.
    seen      n natural images of the training split (LFW: the bundled model's training faces,
              unflipped; CelebA: its train partition), beside the held-out natural set.

n is ``control_n``, at most and by default the synthetic set's size (the seen set: fewer where the
training split has fewer, 80 for LFW): a derived set then holds every synthetic image, and its
comparison's synthetic ratio is the study's own complexity ratio. The derived sets (framing, spectrum) keep their
source image's id, and so its noise: a control image differs from its synthetic source in the
matched property alone. ``metrics.matched_controls`` turns their traces into the summary's numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..data import LFWFaces, load_dataset
from ..data.controls import (FaceBox, channel_moments, estimate_face_box, match_moments, match_spectrum,
                             radial_amplitude, reframe, synthetic_face_box)
from .metrics import CONTROL_KINDS

CONTROLS = tuple(CONTROL_KINDS)  # framing, spectrum (matched), seen (exposure)
SEEN_INDEX = 2  # the seen set's dataset index in the noise seeds (0 synthetic, 1 natural)
_FACE_SETS = ("lfw", "celeba")  # natural specs whose images are aligned faces with a training split


class ControlSet(NamedTuple):
    images: torch.Tensor   # (n, 3, S, S) in the items' range
    labels: torch.Tensor   # (n, S, S)
    ids: list              # image ids: the source's (derived sets) or their own
    index: int             # dataset index of their noise seeds
    sources: list          # stable ids (the latents' cache key)


def available(config) -> tuple:
    """The requested controls (config.controls) the natural set allows: framing and seen need aligned
    natural faces with a training split (lfw, celeba:PATH); spectrum works with any set."""
    kind = config.natural.partition(":")[0]
    faces = kind.startswith("lfw") or kind in _FACE_SETS
    return tuple(c for c in config.controls if c == "spectrum" or faces)


def framing_set(images, labels, attributes: list, sources: list, natural_images) -> tuple:
    """(ControlSet fields images, labels, sources; the framing table) of the framing control.

    images (n, 3, S, S) / labels (n, S, S): synthetic faces with their ``attributes``; natural_images
    the natural set. The table has one row per set (natural: estimated; synthetic: from the
    generator, mean over images; framing_estimated: the natural set's estimator run on the framed
    images' mean, the check that both sets are framed alike when measured the same way; its eyes
    are reliable, its mouth less so: a grey synthetic mouth is not darker than every skin tone)
    with columns set, x, y, width, height, size."""
    target = estimate_face_box(natural_images)
    boxes = [synthetic_face_box(a) for a in attributes]
    framed, framed_labels = reframe(images, labels, boxes, target)
    mean_box = FaceBox(*np.mean(np.array(boxes), axis=0))
    rows = [("natural", target), ("synthetic", mean_box), ("framing_estimated", estimate_face_box(framed))]
    table = pd.DataFrame([{"set": name, **box._asdict(), "size": box.size} for name, box in rows])
    return framed, framed_labels, [f"framing:{s}" for s in sources], table


def spectrum_set(images, natural_images) -> torch.Tensor:
    """The spectrum control's images (n, 3, S, S) float32: ``match_spectrum`` to the natural set's
    mean radial amplitude, then ``match_moments`` to its mean channel means and sds."""
    matched = match_spectrum(images, radial_amplitude(natural_images).mean(0))
    mean, std = channel_moments(natural_images)
    return match_moments(matched, mean, std).float()


def seen_dataset(config, size: int, n: int):
    """The first n (at most all) natural training images of the seen control: LFW's 80 training
    faces without their training flips, or CelebA's train partition."""
    if config.natural.partition(":")[0].startswith("lfw"):
        faces = LFWFaces(split="train", size=size, flip=False)
        return torch.utils.data.Subset(faces, range(min(n, len(faces))))
    return load_dataset(config.natural, size=size, n=n, seed=config.seed, split="train")


__all__ = ["CONTROLS", "SEEN_INDEX", "ControlSet", "available", "framing_set", "seen_dataset",
           "spectrum_set"]
