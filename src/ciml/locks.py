"""Advisory folder locks: two ciml processes never write into the same folder at once.

A lock is ``fcntl.flock`` on ``<folder>/.ciml.lock``, which also holds the owner's pid for the message.
The kernel drops the lock when its process dies (even by SIGKILL), so a stale file never blocks a re-run.

Example:
    >>> with folder_lock("preds"):  # doctest: +SKIP
    ...     write_predictions()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ciml.errors import CimlError

LOCK_NAME = ".ciml.lock"


class FolderLockedError(CimlError):
    """Another process holds the folder's lock."""


def _owner(handle: int) -> str:
    try:
        text = os.pread(handle, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``<folder>/.ciml.lock`` (creating the folder) for the block, or fail at once.

    The lock file is removed on release, so finished output folders hold only outputs.

    Raises:
        FolderLockedError: another ciml process holds it; the message names its pid and the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = _acquire(path, folder)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds the file gone and retries
        os.close(handle)  # closing releases the flock


def _acquire(path: Path, folder: Path) -> int:
    """A locked handle on ``path``; retried when the holder removed the file while we waited for it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(handle)
            os.close(handle)
            raise FolderLockedError(
                f"another ciml process (pid {owner}) is writing to {folder}; wait for it to finish "
                f"or choose another folder (lock: {path})"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        os.close(handle)
