"""Switching ``/usr`` atomically: ``renameat2(RENAME_EXCHANGE)`` or a symlink replaced with ``rename(2)``.

``exchange``: staging and ``/usr`` are real directories swapped in one syscall (upstream moss).  ``symlink``:
``/usr`` is a relative symlink to ``.moss/root/<id>/usr``; a new link is created beside it and renamed over it,
which needs only plain rename — for kernels whose filesystems refuse RENAME_EXCHANGE (Asterinas on ext2 returns
EINVAL).  Either way a power cut leaves ``/usr`` entirely old or entirely new.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reference_impl.fsutil import fsync_dir
from reference_impl.installation import ROOT_LINKS, Installation
from stonelab.errors import StonelabError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "loongarch64": 276}


class SwapStrategy(enum.StrEnum):
    AUTO = "auto"
    EXCHANGE = "exchange"
    SYMLINK = "symlink"


def renameat2_exchange(a: Path, b: Path) -> None:
    """Atomically exchange two paths on the same filesystem (raises OSError with the kernel's errno)."""
    number = SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"renameat2 syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(number), ctypes.c_int(AT_FDCWD), os.fsencode(a),
                          ctypes.c_int(AT_FDCWD), os.fsencode(b), ctypes.c_uint(RENAME_EXCHANGE))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def exchange_supported(directory: Path) -> tuple[bool, str]:
    """Probe RENAME_EXCHANGE on the filesystem holding ``directory``; (supported, reason)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".swap-probe-", dir=directory) as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        a.mkdir()
        b.mkdir()
        (a / "x").touch()
        try:
            renameat2_exchange(a, b)
        except OSError as err:
            return False, f"renameat2(RENAME_EXCHANGE) fails on this filesystem: {os.strerror(err.errno)}"
        if not (b / "x").exists():
            return False, "renameat2(RENAME_EXCHANGE) returned success but did not exchange"
    return True, "renameat2(RENAME_EXCHANGE) works on this filesystem"


@dataclass(frozen=True)
class SwapChoice:
    strategy: SwapStrategy
    reason: str


def choose_strategy(inst: Installation, requested: SwapStrategy) -> SwapChoice:
    """Keep the layout the root already has; on a fresh root probe the filesystem."""
    usr = inst.usr
    current = SwapStrategy.SYMLINK if usr.is_symlink() else SwapStrategy.EXCHANGE if usr.is_dir() else None
    if requested is not SwapStrategy.AUTO:
        if current is not None and current is not requested and inst.active_state() is not None:
            raise StonelabError(f"{usr}: managed with the {current.value} strategy; cannot switch to "
                                f"--swap {requested.value}")
        return SwapChoice(requested, f"--swap {requested.value} requested")
    if usr.is_symlink():
        return SwapChoice(SwapStrategy.SYMLINK, f"{usr} is a symlink")
    works, reason = exchange_supported(inst.trees)
    if works:
        return SwapChoice(SwapStrategy.EXCHANGE, reason)
    if usr.is_dir() and inst.active_state() is not None:
        raise StonelabError(f"{usr}: a real directory managed by exchange, but {reason}")
    return SwapChoice(SwapStrategy.SYMLINK, reason)


def usr_link_target(state_id: int) -> str:
    return f".moss/root/{state_id}/usr"


def switch_symlink(inst: Installation, state_id: int, *, durable: bool) -> None:
    """Point /usr at the state's tree: symlink ``usr.next`` then rename it over ``usr``."""
    tmp = inst.root / "usr.next"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(usr_link_target(state_id), tmp)
    os.rename(tmp, inst.usr)
    if durable:
        fsync_dir(inst.root)


def symlink_state(inst: Installation) -> int | None:
    """The state id /usr points at under the symlink strategy."""
    try:
        target = os.readlink(inst.usr)
    except OSError:
        return None
    parts = Path(target).parts
    return int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None


def update_root_links(inst: Installation, *, durable: bool) -> None:
    """``/bin /sbin /lib /lib64 /lib32`` → ``usr/...`` (as upstream: symlink ``x.next`` then rename)."""
    for name, target in ROOT_LINKS.items():
        if not (inst.usr / target.removeprefix("usr/")).exists():
            continue
        link = inst.root / name
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() and not link.is_symlink():
            continue  # a real directory we do not own; never replace it
        tmp = inst.root / f"{name}.next"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.rename(tmp, link)
    if durable:
        fsync_dir(inst.root)
