"""Temporary folders that a killed process (SIGKILL skips their removal) does not leave behind for good."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOCK = ".lock"  # held by the process using the folder, for as long as it runs


def clear_dead(folder: Path, prefix: str) -> None:
    """Remove the `prefix` folders in `folder` whose process died. A folder goes only when its lock can be
    taken, which no live process allows, whatever machine or container it runs in, and not in its first minute
    (its process may have made the lock and not yet hold it)."""
    for path in Path(folder).glob(f"{prefix}*"):
        try:
            if path.is_symlink() or time.time() - (path / LOCK).stat().st_mtime < 60:
                continue
            fd = os.open(path / LOCK, os.O_RDWR)
        except OSError:  # not such a folder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process, or a filesystem without locks: left alone
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def scratch_folder(prefix: str, folder: Path | None = None) -> Iterator[Path]:
    """A temporary folder in `folder` (the system's temporary folder by default), locked while in use, after
    removing those of earlier processes with the same prefix that were killed."""
    folder = Path(folder or tempfile.gettempdir())
    clear_dead(folder, prefix)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=folder) as tmp:
        fd = os.open(Path(tmp) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield Path(tmp)
        finally:
            os.close(fd)
