"""Every file the package writes goes through here: atomically (a temporary file or folder beside
the target, then a rename), so a folder never holds a half-written table, JSON file, report or
checkpoint, whatever kills the process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path``; when the block ends without error it replaces
    ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; results are files to share, as open() would make them
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(text: str, path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(obj, path, allow_nan: bool = True) -> Path:
    return write_text(json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n", path)


def write_table(df, path) -> Path:
    """A pandas DataFrame as Parquet (index dropped)."""
    with atomic_path(path) as tmp:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
    return Path(path)


def write_image(image, path) -> Path:
    """A PIL image in the format its file name says (.png, .jpg, ...)."""
    from PIL import Image

    fmt = Image.registered_extensions()[Path(path).suffix.lower()]
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return Path(path)


def read_table(out_dir, name: str):
    """``out_dir/<name>.parquet`` as a DataFrame, or None when it does not exist."""
    import pandas as pd

    path = Path(out_dir) / f"{name}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def previous_folder(path) -> str:
    """Where ``atomic_folder`` keeps the previous contents of ``path`` while it swaps them: a reader
    finding ``path`` missing after a crash takes this one."""
    return str(path) + ".old"


@contextlib.contextmanager
def atomic_folder(path):
    """Yields an empty temporary folder beside ``path``; when the block ends without error it
    replaces the folder ``path`` (two renames: the old folder moves to ``previous_folder(path)``
    first, then is deleted), otherwise it is deleted and ``path`` is left as it was."""
    path = str(path)
    tmp, old = path + ".tmp", previous_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
