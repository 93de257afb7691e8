"""Matched-stimulus control images: the generator's landmarks against its own label masks, crops that
carry a face box to a target box, the face-box estimator on images with known features, and
spectrum / moment matching checked with numpy's FFT in float64."""

import numpy as np
import pytest
import torch

from diffcirc.data import PART_LABELS, generate, render_face, sample_attributes
from diffcirc.data.controls import (FaceBox, estimate_face_box, match_moments, match_spectrum, radial_amplitude,
                                    reframe, synthetic_face_box)
from diffcirc.data.synthetic import face_landmarks

SIZE = 256  # high enough that a label centroid locates a feature to a fraction of a percent of the frame


def _neutral(seed: int) -> dict:
    """A face whose mouth is the neutral ellipse (a smile's band is not centred on the mouth point)."""
    return {**sample_attributes(seed), "mouth_shape": "neutral"}


def _centroid(labels: np.ndarray, part: str) -> tuple:
    """(x, y) in frame fractions of the pixels labelled ``part``."""
    rows, cols = np.nonzero(labels == PART_LABELS[part])
    s = labels.shape[0]
    return (cols.mean() + 0.5) / s, (rows.mean() + 0.5) / s


def _label_box(labels: np.ndarray) -> FaceBox:
    return FaceBox.from_landmarks(*(_centroid(labels, p) for p in ("left_eye", "right_eye", "mouth")))


@pytest.mark.parametrize("seed", range(6))
def test_generator_landmarks_are_where_it_paints_the_eyes_and_mouth(seed):
    attrs = _neutral(seed)
    _, labels = render_face(attrs, SIZE)
    marks = face_landmarks(attrs)
    for part in ("left_eye", "right_eye", "mouth"):
        x, y = ((v + 1) / 2 for v in marks[part])
        cx, cy = _centroid(labels, part)
        assert abs(cx - x) < 3 / SIZE and abs(cy - y) < 3 / SIZE, part


@pytest.mark.parametrize("seed", range(6))
def test_reframed_face_box_is_the_target(seed):
    """Measured on the cropped label map itself (not through the crop's own arithmetic)."""
    attrs = _neutral(seed)
    image, labels = render_face(attrs, SIZE, supersample=1)
    target = FaceBox(x=0.45, y=0.55, width=0.30, height=0.36)
    out, out_labels = reframe(torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1,
                              torch.from_numpy(labels.astype(np.int64))[None], [synthetic_face_box(attrs)], target)
    got = _label_box(out_labels[0].numpy())
    assert out.shape == (1, 3, SIZE, SIZE) and out.min() >= -1 and out.max() <= 1
    assert got.x == pytest.approx(target.x, abs=4 / SIZE) and got.y == pytest.approx(target.y, abs=4 / SIZE)
    assert got.size == pytest.approx(target.size, rel=0.03)
    # the box before the crop is the generator's, and far from the target: the crop did the work
    assert synthetic_face_box(attrs).size < 0.8 * target.size


def test_reframe_keeps_an_image_already_at_the_target():
    image, labels, attrs = generate(3, 64)
    box = synthetic_face_box(attrs)
    x = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    lab = torch.from_numpy(labels.astype(np.int64))[None]
    out, out_labels = reframe(x, lab, [box], box)
    assert torch.allclose(out, x.clamp(-1, 1), atol=1e-5) and torch.equal(out_labels, lab)


def _blob_image(size: int, eyes, mouth_y: float) -> torch.Tensor:
    """(1, 3, S, S): a bright face with two dark round eyes and a dark horizontal mouth bar."""
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.full((size, size), 0.6)
    for ex, ey in eyes:
        img -= 0.5 * np.exp(-((x - ex) ** 2 + (y - ey) ** 2) / (2 * 0.03 ** 2))
    mid = (eyes[0][0] + eyes[1][0]) / 2
    img -= 0.4 * np.exp(-((y - mouth_y) ** 2) / (2 * 0.02 ** 2)) * (np.abs(x - mid) < 0.12)
    img[:, int(0.8 * size):int(0.86 * size)] = -0.9  # a dark vertical band (hair, background): not a feature
    return torch.from_numpy(img).float()[None, None].expand(1, 3, -1, -1)


@pytest.mark.parametrize("eyes, mouth_y", [(((0.3, 0.38), (0.66, 0.38)), 0.74), (((0.35, 0.45), (0.6, 0.43)), 0.7)])
def test_face_box_estimate_finds_known_features(eyes, mouth_y):
    got = estimate_face_box(_blob_image(64, eyes, mouth_y))
    want = FaceBox.from_landmarks(eyes[0], eyes[1], ((eyes[0][0] + eyes[1][0]) / 2, mouth_y))
    for name in ("x", "y", "width", "height"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1.5 / 64), name


def _radial_numpy(channel: np.ndarray) -> np.ndarray:
    """Radially averaged |FFT| of one (S, S) channel, by explicit ring loops in float64."""
    s = channel.shape[0]
    amp = np.abs(np.fft.fft2(channel.astype(np.float64)))
    k = np.fft.fftfreq(s) * s
    radius = np.rint(np.hypot(k[:, None], k[None, :])).astype(int)
    return np.array([amp[radius == r].mean() for r in range(radius.max() + 1)])


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1


def test_radial_amplitude_equals_a_numpy_ring_average():
    x = _images(2, 17)
    got = radial_amplitude(x).numpy()
    for i in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[i, c], _radial_numpy(x[i, c].numpy()), rtol=1e-12)


def test_spectrum_matching_sets_the_radial_spectrum_and_keeps_the_phases():
    x, reference = _images(3, 32, seed=1), _images(5, 32, seed=2).cumsum(-1) / 4  # a redder spectrum
    target = radial_amplitude(reference).mean(0)
    out = match_spectrum(x, target).numpy()
    assert np.isrealobj(out)
    for i in range(3):
        for c in range(3):
            np.testing.assert_allclose(_radial_numpy(out[i, c]), target[c].numpy(), rtol=1e-9)
            before, after = np.fft.fft2(x[i, c].numpy()), np.fft.fft2(out[i, c])
            keep = np.abs(before) > 1e-9
            np.testing.assert_allclose(np.angle(after[keep] * np.conj(before[keep])), 0, atol=1e-7)


def test_moment_matching_sets_each_channels_mean_and_sd():
    x = _images(3, 16, seed=4)
    mean, std = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 0.25, 0.4])
    out = match_moments(x, mean, std).numpy()
    np.testing.assert_allclose(out.mean(axis=(2, 3)), np.broadcast_to(mean.numpy(), (3, 3)), atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(2, 3)), np.broadcast_to(std.numpy(), (3, 3)), rtol=1e-12)
