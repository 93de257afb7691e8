"""The output-folder lock within one process (two open files conflict as two processes do); the
CLI's refusal and --wait across processes are in test_driver.py."""

import os

import pytest

from diffcirc.analysis.folder_lock import LOCK_FILE, FolderBusyError, hold_folder
from diffcirc.errors import InputError


def test_a_held_folder_refuses_a_second_holder_naming_the_pid(tmp_path):
    folder = tmp_path / "run"
    with hold_folder(folder):
        with pytest.raises(FolderBusyError, match=f"in use by another analysis run \\(pid {os.getpid()}\\)") as err:
            with hold_folder(folder):
                pass
    assert isinstance(err.value, InputError) and "--wait" in str(err.value)
    with hold_folder(folder):  # released at the end of the block
        pass


def test_lock_file_names_the_holder_only_while_held(tmp_path):
    with hold_folder(tmp_path / "new" / "run") as folder:  # created when missing
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (folder / LOCK_FILE).read_text() == ""


def test_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with hold_folder(tmp_path):
            raise RuntimeError("boom")
    with hold_folder(tmp_path):
        pass
