"""The durability primitives every layer uses: fsync of a directory (a rename or create inside it), syncfs."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs_fd(fd: int, name: str | Path) -> None:
    """Flush the whole filesystem holding ``fd`` (data, inodes, directories) in one call."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs({name}): {os.strerror(err)}")


def syncfs(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs_fd(fd, path)
    finally:
        os.close(fd)
