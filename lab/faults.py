"""Faults the lab injects into a system root and its disk (beyond the package manager's own fault points): run in
the lab process for the host target, or in the guest as ``python -m lab.faults ACTION ROOT DISK [ARG]`` for the VM
target. DISK is the GPT system disk (an image on the host, ``/dev/vda`` in the guest)."""
from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from lab.bootprobe import ESP_TYPE, SECTOR, partition_table
from reference_impl.boot.esp import MtoolsEsp

SBIN_PATH = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}


def corrupt_largest_asset(root: Path, disk: Path | None = None, arg: str = "") -> str:
    """Flip the first byte of the largest asset in the store; returns its path relative to the root."""
    return corrupt_largest_file(root / ".moss" / "assets", root)


def corrupt_largest_file(base: Path, root: Path, pattern: str = "*") -> str:
    """Flip the first byte of the largest regular file below ``base`` whose name matches ``pattern`` (symlinks
    not followed); returns its path relative to ``root``. Raises RuntimeError when there is none."""
    assets = sorted(p for p in base.rglob(pattern) if p.is_file() and not p.is_symlink())
    if not assets:
        raise RuntimeError(f"{base}: no file to corrupt")
    victim = max(assets, key=lambda p: (p.stat().st_size, str(p)))
    mode = victim.stat().st_mode
    victim.chmod(0o644)
    with open(victim, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]) if first else b"!")
    victim.chmod(mode)  # the content rots, nothing else
    return str(victim.relative_to(root))


def _esp(disk: Path) -> tuple[int, dict]:
    table = partition_table(disk) or {}
    for number, part in enumerate(table.get("partitions", []), 1):
        if part.get("type", "").upper() == ESP_TYPE:
            return number, part
    raise RuntimeError(f"{disk}: no ESP partition to break")


def delete_esp(root: Path, disk: Path, arg: str = "") -> str:
    """Remove the ESP's GPT entry (the filesystem's bytes stay where they were); on a block device the kernel
    forgets the partition too, as it would after the next boot."""
    number, _part = _esp(disk)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--delete", str(disk), str(number)],
                   check=True, capture_output=True, env=SBIN_PATH)
    if stat.S_ISBLK(os.stat(disk).st_mode):
        _forget_partition(disk, number)
        return f"deleted GPT entry {number} (the ESP) of {disk}; the kernel dropped {disk}{number}"
    return f"deleted GPT entry {number} (the ESP) of {disk}"


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int),
                ("data", ctypes.c_void_p)]


BLKPG, BLKPG_DEL_PARTITION = 0x1269, 2  # <linux/fs.h>, <linux/blkpg.h>: what `partx -d` issues


def _forget_partition(disk: Path, number: int) -> None:
    """Tell the kernel that partition ``number`` of the block device ``disk`` is gone (BLKPG_DEL_PARTITION)."""
    part = _BlkpgPartition(pno=number)
    arg = _BlkpgIoctlArg(op=BLKPG_DEL_PARTITION, datalen=ctypes.sizeof(part),
                         data=ctypes.cast(ctypes.pointer(part), ctypes.c_void_p))
    fd = os.open(disk, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKPG, arg)
    finally:
        os.close(fd)


def wipe_esp(root: Path, disk: Path, arg: str = "") -> str:
    """Zero the first MiB of the ESP: its boot sector, FATs and root directory are gone, the partition stays."""
    _number, part = _esp(disk)
    with open(disk, "r+b") as handle:
        handle.seek(part["start"] * SECTOR)
        handle.write(bytes(1 << 20))
        handle.flush()
        os.fsync(handle.fileno())  # on the device, where a reader of the partition's own node looks
    return f"zeroed the first MiB of the ESP of {disk}"


def fill_esp(root: Path, disk: Path, arg: str = "") -> str:
    """Fill the ESP's free space with one file, leaving less than one cluster."""
    _number, part = _esp(disk)
    fat = MtoolsEsp(disk, part["start"] * SECTOR)
    free = fat.free_bytes() - fat.cluster_size()
    if free > 0:
        fat.write_atomic("FILLER.BIN", bytes(free))
    return f"filled the ESP of {disk}: {fat.free_bytes()} bytes left"


def fill_root(root: Path, disk: Path | None = None, arg: str = "") -> str:
    """Fill the root filesystem (a file under /.moss, which no invariant reads) until ENOSPC."""
    filler = root / ".moss" / "lab-filler"
    filler.parent.mkdir(parents=True, exist_ok=True)
    chunk = bytes(1 << 20)
    try:
        with open(filler, "ab") as handle:
            while True:
                handle.write(chunk)
                handle.flush()
    except OSError:
        pass
    with open(filler, "ab") as handle:  # the last partial blocks
        try:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        except OSError:
            pass
    return f"filled the root filesystem: {shutil.disk_usage(root).free} bytes left"


def delete_state_tree(root: Path, disk: Path | None = None, arg: str = "") -> str:
    """Remove ``/.moss/root/<id>`` (a state's archived tree), as a careless cleanup would."""
    tree = root / ".moss" / "root" / arg
    if not arg.isdigit() or not tree.is_dir():
        raise RuntimeError(f"{tree}: no archived tree of state {arg}")
    shutil.rmtree(tree)
    return f"removed {tree}"


ACTIONS = {"corrupt-asset": corrupt_largest_asset, "delete-esp": delete_esp, "wipe-esp": wipe_esp,
           "fill-esp": fill_esp, "fill-root": fill_root, "delete-state-tree": delete_state_tree}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (2, 3, 4) or args[0] not in ACTIONS:
        print(f"usage: python -m lab.faults {{{'|'.join(ACTIONS)}}} ROOT [DISK [ARG]]", file=sys.stderr)
        return 2
    disk = Path(args[2]) if len(args) > 2 and args[2] else None
    print(ACTIONS[args[0]](Path(args[1]), disk, args[3] if len(args) > 3 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
