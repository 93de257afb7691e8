"""Writing result tables: atomically (temporary file, then rename), so a folder never holds a
half-written table, and reading them back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_table(df: pd.DataFrame, path) -> Path:
    return _atomic(path, lambda tmp: df.reset_index(drop=True).to_parquet(tmp, index=False))


def write_text(text: str, path) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(obj, path, allow_nan: bool = True) -> Path:
    return write_text(json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n", path)


def read_table(out_dir, name: str) -> pd.DataFrame | None:
    """``out_dir/<name>.parquet`` as a DataFrame, or None when it does not exist."""
    path = Path(out_dir) / f"{name}.parquet"
    return pd.read_parquet(path) if path.is_file() else None
