"""One analysis run per output folder: an exclusive lock on a file in the folder, held for the run.

    with hold_folder("runs/demo"):              # FolderBusyError at once while another run holds it
        ...
    with hold_folder("runs/demo", wait=True):   # or wait until that run ends
        ...

The lock is ``flock`` on ``<folder>/.analysis.lock``, so the OS releases it when the holding
process ends, however it ends: a killed run leaves nothing to clean up. The holder writes its pid
into the file, so a refused run can name it. The file itself stays: deleting a lock file races
with a process that has already opened it and waits on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from ..errors import InputError

LOCK_FILE = ".analysis.lock"


class FolderBusyError(InputError):
    """Another process holds the output folder."""


def _holder(fd: int) -> str:
    """'pid N' of the process holding the lock on fd's file. The holder writes its pid just after it
    takes the lock, so an empty file is read again for a moment before giving up."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return f"pid {text}"
        time.sleep(0.02)
    return "pid unknown"


@contextlib.contextmanager
def hold_folder(folder, wait: bool = False):
    """Holds the exclusive lock of ``folder`` (created if missing) for the block. When another
    process holds it: raise FolderBusyError naming that process's pid, or, with ``wait``, say so
    on stderr and block until it is released."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise FolderBusyError(
                    f"{folder} is in use by another analysis run ({holder}); wait for it to end, rerun with "
                    "--wait to wait and then resume from its finished units, or choose another --out") from None
            print(f"{folder} is in use by another analysis run ({holder}); waiting for it to end",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # a released folder names no holder
    finally:
        os.close(fd)  # releases the lock


__all__ = ["FolderBusyError", "LOCK_FILE", "hold_folder"]
