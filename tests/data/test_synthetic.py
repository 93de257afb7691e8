"""Synthetic faces: determinism, attribute/label consistency, grayscale, dataset wrapper, export CLI."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from diffcirc.data import HELDOUT_SEED_BASE, PART_LABELS, SyntheticFaces, collate, generate, sample_attributes
from diffcirc.data.synthetic import FACE_SHAPES, HAIR_STYLES, MOUTH_SHAPES

SEEDS = range(40)
FEATURES = [PART_LABELS[k] for k in ("left_eye", "right_eye", "brows", "nose", "mouth")]


def _face_ellipse(attrs, size):
    """The face ellipse at pixel centres, from the recorded attributes (independent of the renderer's masks)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    rx, ry = (r * attrs["face_size"] for r in FACE_SHAPES[attrs["face_shape"]])
    th = np.deg2rad(attrs["roll_deg"])
    dx, dy = x - attrs["center_x"], y - attrs["center_y"]
    u = (dx * np.cos(th) + dy * np.sin(th)) / rx
    v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
    return u**2 + v**2 <= 1.0


def test_same_seed_same_face_different_seeds_differ():
    a_img, a_lab, a_attr = generate(123, 32)
    b_img, b_lab, b_attr = generate(123, 32)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_attr == b_attr
    c_img, c_lab, _ = generate(124, 32)
    assert np.abs(a_img - c_img).mean() > 0.01
    assert (a_lab != c_lab).any()


def test_attributes_do_not_depend_on_resolution():
    _, _, small = generate(7, 16)
    _, _, large = generate(7, 96)
    assert small == large == {**sample_attributes(7), "grayscale": False}


@pytest.mark.parametrize("size", [32, 64])
def test_features_lie_inside_the_face(size):
    for seed in SEEDS:
        _, labels, attrs = generate(seed, size)
        face = _face_ellipse(attrs, size)
        feature = np.isin(labels, FEATURES)
        assert feature.any()
        assert not (feature & ~face).any(), f"seed {seed}: feature pixels outside the face ellipse"
        assert set(np.unique(labels)) <= set(range(8))


def test_part_layout():
    for seed in SEEDS:
        _, labels, _ = generate(seed, 64)
        rows, cols = np.indices(labels.shape)
        centroid = {k: (rows[labels == v].mean(), cols[labels == v].mean()) for k, v in PART_LABELS.items()
                    if k in ("left_eye", "right_eye", "nose", "mouth") and (labels == v).any()}
        assert {"left_eye", "right_eye", "mouth"} <= set(centroid), f"seed {seed}: missing parts"
        # label 3 is the eye on the image's left
        assert centroid["left_eye"][1] < centroid["right_eye"][1]
        eyes_row = max(centroid["left_eye"][0], centroid["right_eye"][0])
        assert centroid["mouth"][0] > eyes_row, f"seed {seed}: mouth not below the eyes"
        if "nose" in centroid:
            assert eyes_row < centroid["mouth"][0]


def test_attributes_control_the_picture():
    seen_styles, seen_mouths, seen_shapes = set(), set(), set()
    for seed in range(120):
        image, labels, attrs = generate(seed, 64)
        seen_styles.add(attrs["hair_style"])
        seen_mouths.add(attrs["mouth_shape"])
        seen_shapes.add(attrs["face_shape"])
        hair = labels == PART_LABELS["hair"]
        if attrs["hair_style"] == "bald":
            assert not hair.any()
        if attrs["hair_style"] == "long":  # long hair falls below the eyes
            eye_row = np.nonzero(np.isin(labels, [3, 4]))[0].mean()
            assert np.nonzero(hair)[0].max() > eye_row + 10
        if attrs["background"] == "flat":
            bg = labels == 0
            colour = np.array([int(attrs["bg_colour_a"][i:i + 2], 16) for i in (1, 3, 5)]) / 255
            # anti-aliasing (2x supersampling) blends only pixels near part borders; two pixels away
            # from them the colour is exact
            interior = bg.copy()
            for _ in range(2):
                eroded = interior.copy()
                for axis in (0, 1):
                    for shift in (1, -1):
                        eroded &= np.roll(interior, shift, axis=axis)
                interior = eroded
            np.testing.assert_allclose(image[interior], np.broadcast_to(colour, image[interior].shape), atol=1e-6)
    assert seen_styles == set(HAIR_STYLES) and seen_mouths == set(MOUTH_SHAPES) and seen_shapes == set(FACE_SHAPES)


def test_grayscale_has_equal_channels_and_same_labels():
    for seed in range(10):
        gray, gray_labels, attrs = generate(seed, 32, grayscale=True)
        colour, labels, _ = generate(seed, 32)
        assert attrs["grayscale"]
        np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
        np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
        np.testing.assert_array_equal(gray_labels, labels)
        np.testing.assert_allclose(gray[..., 0], colour @ np.array([0.299, 0.587, 0.114]), atol=1e-5)


def test_dataset_items_and_collate():
    ds = SyntheticFaces(n=6, size=24, seed=500, grayscale=True)
    assert SyntheticFaces(n=1).seed == HELDOUT_SEED_BASE  # default is the held-out range
    item = ds[4]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (24, 24) and item["labels"].dtype == torch.int64
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["source"] == "synthetic-gray:504" and item["attributes"]["seed"] == 504
    image, labels, _ = generate(504, 24, grayscale=True)  # item i recomputed alone from seed + i
    torch.testing.assert_close(item["image"], torch.from_numpy(image).permute(2, 0, 1) * 2 - 1)
    with pytest.raises(IndexError):
        ds[6]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["labels"].shape == (4, 24, 24)
    assert [a["seed"] for a in batch["attributes"]] == [500, 501, 502, 503]


def test_faces_cli_exports_images_labels_and_csv(tmp_path):
    from diffcirc.cli import main

    assert main(["faces", "--n", "3", "--size", "20", "--seed", "9", "--out", str(tmp_path), "--grayscale"]) == 0
    with open(tmp_path / "attributes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == [9, 10, 11]
    for r in rows:
        image = np.asarray(Image.open(tmp_path / r["image"]))
        labels = np.asarray(Image.open(tmp_path / r["labels"]))
        ref_image, ref_labels, _ = generate(int(r["seed"]), 20, grayscale=True)
        assert image.shape == (20, 20, 3)
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_allclose(image / 255, ref_image, atol=1 / 255)
        assert r["mouth_shape"] in MOUTH_SHAPES and r["grayscale"] == "True"
