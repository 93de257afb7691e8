"""diffcirc.files: every write is all or nothing, and files get the modes open() would give them."""

import os
import stat

import pandas as pd
import pytest

from diffcirc.files import (atomic_folder, atomic_path, previous_folder, read_table, write_image, write_json, write_table,
                            write_text)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    write_text("old", target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_files_get_the_mode_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json({"x": 1}, tmp_path / "meta.json")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "meta.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640


def test_tables_round_trip_and_a_missing_table_is_none(tmp_path):
    df = pd.DataFrame({"layer": ["a", "b"], "mean": [0.5, 1.5]}, index=[7, 9])
    write_table(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path, "t"), df.reset_index(drop=True))
    assert read_table(tmp_path, "missing") is None


def test_folder_swap_replaces_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (open(os.path.join(tmp, "a"), "w")).close()
    assert sorted(os.listdir(target)) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (open(os.path.join(tmp, "b"), "w")).close()
            raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["a"]
    with atomic_folder(target) as tmp:
        (open(os.path.join(tmp, "b"), "w")).close()
    assert sorted(os.listdir(target)) == ["b"]
    assert not os.path.exists(previous_folder(target)) and not os.path.exists(str(target) + ".tmp")


def test_images_are_written_in_the_format_of_their_name_and_read_back(tmp_path):
    import numpy as np
    from PIL import Image

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    write_image(Image.fromarray(pixels), tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as back:
        assert back.format == "PNG"
        np.testing.assert_array_equal(np.asarray(back), pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
