"""Natural-image datasets: CelebA layout, image folders with corrupt files, LFW split, photo crops, specs."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffcirc.data import (CelebA, ImageFolder, LFWFaces, NaturalPhotos, SyntheticFaces, collate, lfw_split_indices,
                           load_dataset, parse_mix)
from diffcirc.data.splits import HELDOUT_SEED_BASE, LFW_TRAIN_COUNT, TRAIN_SEED_BASE

# (file, partition, Male, Smiling)
CELEBA = [("000001.jpg", 0, False, True), ("000002.jpg", 0, True, False), ("000003.jpg", 1, False, False),
          ("000004.jpg", 2, False, True), ("000005.jpg", 2, True, True), ("000006.jpg", 0, False, False)]


def _fake_celeba(root):
    """A CelebA tree in the official layout: 178x218 images white inside the central 140x140, black outside."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    for name, *_ in CELEBA:
        arr = np.zeros((218, 178, 3), np.uint8)
        arr[39:179, 19:159] = 255
        Image.fromarray(arr).save(images / name, quality=100)
    sign = lambda b: " 1" if b else "-1"  # noqa: E731
    rows = [f"{n} {sign(m)} {sign(s)}" for n, _, m, s in CELEBA]
    (root / "list_attr_celeba.txt").write_text(f"{len(CELEBA)}\nMale Smiling\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p, *_ in CELEBA))


@pytest.mark.parametrize("torchvision_root", [False, True], ids=["official", "torchvision"])
def test_celeba_layout_split_filter_and_crop(tmp_path, torchvision_root):
    _fake_celeba(tmp_path / "celeba" if torchvision_root else tmp_path)
    assert len(CelebA(str(tmp_path), size=16)) == 6
    train = CelebA(str(tmp_path), size=16, split="train")
    assert train.files == ["000001.jpg", "000002.jpg", "000006.jpg"]
    women = CelebA(str(tmp_path), size=16, split="all", attributes={"Male": False})
    assert women.files == ["000001.jpg", "000003.jpg", "000004.jpg", "000006.jpg"]
    smiling_test_women = CelebA(str(tmp_path), size=16, split="test", attributes={"Male": False, "Smiling": True})
    assert smiling_test_women.files == ["000004.jpg"]
    item = smiling_test_women[0]
    assert item["image"].shape == (3, 16, 16) and item["labels"].shape == (16, 16)
    assert item["image"].min() > 0.9  # the central 140x140 crop is all white: the black border is gone
    assert item["attributes"]["Smiling"] is True and item["attributes"]["Male"] is False
    assert item["attributes"]["partition"] == 2 and item["source"] == "celeba:000004.jpg"
    assert len(CelebA(str(tmp_path), size=16, n=2, seed=1)) == 2
    with pytest.raises(ValueError, match="unknown CelebA attributes"):
        CelebA(str(tmp_path), attributes={"Bald": True})
    with pytest.raises(ValueError, match="split"):
        CelebA(str(tmp_path), split="val")
    spec = load_dataset(f"celeba:{tmp_path}", size=16, split="heldout")  # heldout = CelebA's test partition
    assert spec.files == ["000004.jpg", "000005.jpg"]


def test_celeba_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        CelebA(str(tmp_path))


def test_image_folder_skips_corrupt_files(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 40), 10, np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolder(str(tmp_path), size=8)
    assert ds.skipped == 2 and len(ds) == 2
    assert ds.skipped_files == [str(tmp_path / "sub" / "broken.jpg"), str(tmp_path / "truncated.png")]
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["source"] == ["folder:a.png", "folder:sub/b.jpg"]
    torch.testing.assert_close(batch["image"][0], torch.full((3, 8, 8), 200 / 255 * 2 - 1))
    assert torch.allclose(batch["image"][1][0], batch["image"][1][2])  # grayscale file -> 3 equal channels


def test_lfw_split_is_fixed_and_disjoint():
    train, held = lfw_split_indices("train"), lfw_split_indices("heldout")
    assert len(train) == LFW_TRAIN_COUNT and len(held) == 100 - LFW_TRAIN_COUNT
    assert not set(train) & set(held) and set(train) | set(held) == set(range(100))
    assert lfw_split_indices("train") == train  # deterministic
    tr, ho = LFWFaces("train", size=32), LFWFaces("heldout", size=32)
    assert len(tr) == 2 * LFW_TRAIN_COUNT and len(ho) == 100 - LFW_TRAIN_COUNT  # flips only in train
    train_ids = {tr[i]["attributes"]["lfw_index"] for i in range(len(tr))}
    held_ids = {ho[i]["attributes"]["lfw_index"] for i in range(len(ho))}
    assert train_ids == set(train) and held_ids == set(held)
    torch.testing.assert_close(LFWFaces("heldout", size=32)[3]["image"], ho[3]["image"])
    with pytest.raises(ValueError, match="train split only"):
        LFWFaces("heldout", flip=True)


def test_lfw_flip_items_are_mirrors():
    tr = LFWFaces("train", size=20)
    a, b = tr[5], tr[5 + LFW_TRAIN_COUNT]
    assert not a["attributes"]["flipped"] and b["attributes"]["flipped"] and b["source"].endswith(":flip")
    torch.testing.assert_close(b["image"], a["image"].flip(-1))
    assert a["image"].shape == (3, 20, 20) and torch.equal(a["image"][0], a["image"][1])
    assert len(a["labels"].unique()) > 4  # SLIC regions, not one blob


def test_natural_photos_are_deterministic_crops():
    ds = NaturalPhotos(n=8, size=24, seed=3)
    a, b = ds[2], NaturalPhotos(n=8, size=24, seed=3)[2]
    torch.testing.assert_close(a["image"], b["image"])
    assert a["source"] == b["source"] and a["attributes"]["photo"] in ("coffee", "chelsea", "rocket", "coins",
                                                                          "hubble_deep_field", "immunohistochemistry",
                                                                          "moon", "grass", "gravel", "brick")
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    for i in range(len(ds)):  # textured gray photos must still split into several regions
        assert len(ds[i]["labels"].unique()) >= 4, ds[i]["source"]


def test_load_dataset_specs(tmp_path):
    syn = load_dataset("synthetic", size=16, n=5, seed=2)
    assert isinstance(syn, SyntheticFaces) and syn.seed == HELDOUT_SEED_BASE + 2 and not syn.grayscale
    gray = load_dataset("synthetic-gray", size=16, n=5, split="train")
    assert gray.grayscale and gray.seed == TRAIN_SEED_BASE and len(gray) == 5
    with pytest.raises(ValueError, match="training synthetic seeds"):
        load_dataset("synthetic", n=10, seed=999_995, split="train")
    assert len(load_dataset("lfw", size=16)) == 20
    assert len(load_dataset("lfw", size=16, split="train")) == 160
    assert len(load_dataset("lfw-heldout", size=16, n=7)) == 7
    assert load_dataset("lfw-train", size=16)[0]["attributes"]["split"] == "train"
    assert isinstance(load_dataset("photos", size=16, n=3), NaturalPhotos)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "x.png")
    assert len(load_dataset(f"folder:{tmp_path}", size=16)) == 1
    for bad in ("celebA", "folder", "imagenet"):
        with pytest.raises(ValueError, match="unknown dataset spec"):
            load_dataset(bad)


def test_parse_mix():
    assert parse_mix("synthetic:3000, synthetic-gray:3000,lfw-train") == [
        ("synthetic", 3000), ("synthetic-gray", 3000), ("lfw-train", None)]
    assert parse_mix("celeba:/data/celeba:500,folder:/x/y") == [("celeba:/data/celeba", 500), ("folder:/x/y", None)]
    with pytest.raises(ValueError):
        parse_mix(" , ")
