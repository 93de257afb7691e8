"""Unreadable images and malformed dataset files: skipped with one counting warning, or refused naming
the file; never a silent wrong image."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffcirc.data import CelebA, DatasetError, ImageFolder, load_dataset, parse_mix

WEIGHTS = "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("single_thread")


def _png(path, value=128, shape=(20, 24, 3)):
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


# -- 3. unreadable images ------------------------------------------------------------------------------

def _bad_files(folder):
    """A corrupt JPEG, a zero-byte PNG and a text file named .png, in sorted order."""
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    return [str(folder / n) for n in ("corrupt.jpg", "empty.png", "text.png")]


def test_image_folder_skips_unreadable_files_with_one_counting_warning(tmp_path):
    _png(tmp_path / "good.png", 200)
    bad = _bad_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 unreadable file") as record:
        ds = ImageFolder(str(tmp_path), size=8)
    assert len(record) == 1
    assert ds.skipped == 3 and ds.skipped_files == bad
    assert [ds[i]["source"] for i in range(len(ds))] == ["folder:good.png"]


@pytest.mark.parametrize("content", ["nothing", "only-unreadable", "only-other-files"])
def test_image_folder_without_readable_images_raises(tmp_path, content):
    if content == "only-unreadable":
        _bad_files(tmp_path)
    elif content == "only-other-files":
        (tmp_path / "notes.txt").write_text("hello")
    message = "none of the 3 image files" if content == "only-unreadable" else "holds no images"
    with pytest.raises(DatasetError, match=message) as err:
        ImageFolder(str(tmp_path), size=8)
    assert str(tmp_path) in str(err.value)


def test_image_that_breaks_after_the_check_is_named(tmp_path):
    _png(tmp_path / "a.png")
    ds = ImageFolder(str(tmp_path), size=8)
    (tmp_path / "a.png").write_bytes(b"")  # replaced after the dataset was built
    with pytest.raises(DatasetError, match="cannot read image .*a.png"):
        ds[0]


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "deep.png")  # mid-gray in 16 bits
    item = ImageFolder(str(tmp_path), size=8)[0]
    assert item["image"].shape == (3, 8, 8)
    # PIL's convert("RGB") clips 32768 to 255 (white, +1.0); scaled, mid-gray is ~0.0 in [-1, 1]
    torch.testing.assert_close(item["image"], torch.full((3, 8, 8), 128 / 255 * 2 - 1))


def _celeba(root, names, bad=()):
    """A CelebA tree listing ``names`` (all partition 2, attribute Smiling); files in ``bad`` are broken."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    for name in names:
        if name in bad:
            (images / name).write_bytes(b"" if name.startswith("0") else b"\xff\xd8\xff\xe0 garbage")
        else:
            _png(images / name, 150, shape=(218, 178, 3))
    rows = "".join(f"{n}  1\n" for n in names)
    (root / "list_attr_celeba.txt").write_text(f"{len(names)}\nSmiling\n{rows}")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} 2\n" for n in names))


def test_celeba_skips_unreadable_files_and_keeps_n(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    bad = {names[0], "x-corrupt.jpg"}  # a zero-byte file and a corrupt JPEG
    _celeba(tmp_path, names + ["x-corrupt.jpg"], bad=bad)
    with pytest.warns(UserWarning, match="skipped 2 missing or unreadable file") as record:
        full = CelebA(str(tmp_path), size=8)
    assert len(record) == 1
    assert full.skipped == 2 and full.skipped_files == sorted(bad)
    assert full.files == names[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether a seed's permutation meets a bad file first varies
        for seed in range(6):
            some = CelebA(str(tmp_path), size=8, n=4, seed=seed)
            assert len(some.files) == 4 and not set(some.files) & bad, seed  # n readable files, none broken
            assert some.files == CelebA(str(tmp_path), size=8, n=4, seed=seed).files  # same seed, same files
    assert some[0]["image"].shape == (3, 8, 8)


def test_celeba_without_usable_images_raises(tmp_path):
    names = ["000001.jpg", "000002.jpg"]
    _celeba(tmp_path, names, bad=set(names))
    with pytest.raises(DatasetError, match="none of the 2 selected CelebA images") as err:
        CelebA(str(tmp_path), size=8)
    assert "img_align_celeba" in str(err.value)


def test_celeba_malformed_attribute_file_names_the_line(tmp_path):
    _celeba(tmp_path, ["000001.jpg"])
    (tmp_path / "list_attr_celeba.txt").write_text("1\nSmiling\n000001.jpg yes\n")
    with pytest.raises(DatasetError, match=r"list_attr_celeba.txt' line 3: expected a file name and 1 values"):
        CelebA(str(tmp_path), size=8)


def test_dataset_specs_and_mix_counts_are_checked(tmp_path):
    with pytest.raises(ValueError, match="takes no ':' argument"):
        load_dataset("lfw:20")  # was silently all of LFW
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_mix("synthetic:0,lfw-train")
