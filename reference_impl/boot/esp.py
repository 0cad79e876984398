"""The ESP (or XBOOTLDR) as a write target: a mounted vfat directory, or a FAT image reached through mtools.

Both implementations give the same crash-safety: a file is written under ``<name>.tmp``, made durable, then
renamed over the destination, so nothing ever sees a half-written file under its real name.  Paths are
relative, '/'-separated (``loader/entries/x.conf``).  FAT names are case-insensitive: callers compare casefolded.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from reference_impl.boot.device import mount_of, read_mountinfo
from reference_impl.fsutil import fsync_dir
from reference_impl.boot.superblock import probe_bytes
from stonelab.errors import StonelabError

TMP_SUFFIX = ".stl"   # not ".tmp": a foreign "<our file>.tmp" is not a leftover of ours (8.3 kept: mren keeps "vmlinuz" lower case)


class EspError(StonelabError):
    """The ESP cannot be used; the message names it and says why."""


class EspMissingError(EspError):
    pass


class EspNotFatError(EspError):
    pass


class EspFullError(EspError):
    pass


class EspTarget(Protocol):
    def describe(self) -> str: ...
    def check(self) -> None: ...
    def list_files(self) -> list[str]: ...
    def read(self, path: str) -> bytes | None: ...
    def write_atomic(self, path: str, data: bytes | Path) -> None: ...
    def remove(self, path: str) -> None: ...
    def remove_empty_dirs(self, path: str) -> None: ...
    def free_bytes(self) -> int: ...
    def cluster_size(self) -> int: ...


def _size_of(data: bytes | Path) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def foreign_filesystem(head: bytes) -> str | None:
    """What sits there when it is not FAT (for the error message), or None when it is FAT."""
    info = probe_bytes(head)
    if info is not None and info.type == "vfat":
        return None
    if info is not None:
        return info.type
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if not head.strip(b"\0"):
        return "nothing (unformatted, all zeroes)"
    return "no recognisable filesystem (unformatted or damaged)"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fat_cluster_size(head: bytes) -> int:
    """Bytes per cluster from a FAT boot sector (at least 512 when the sector is short or says 0)."""
    if len(head) < 0x0E:
        return 512
    bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", head, 0x0B)
    return bytes_per_sector * sectors_per_cluster or 512


# -- a mounted ESP --------------------------------------------------------------------------------------------------

@dataclass
class DirectoryEsp:
    root: Path
    require_vfat: bool = True
    mountinfo: Path = Path("/proc/self/mountinfo")

    def describe(self) -> str:
        return f"ESP {self.root}"

    def check(self) -> None:
        if not self.root.is_dir():
            raise EspMissingError(f"{self.describe()}: no such directory (ESP not mounted?)")
        if self.require_vfat:
            mount = mount_of(self.root, read_mountinfo(self.mountinfo))
            if mount is None or mount.fstype not in ("vfat", "msdos"):
                kind = mount.fstype if mount else "unknown"
                where = mount.mount_point if mount else str(self.root)
                raise EspNotFatError(f"{self.describe()}: is on {kind} ({where}), not a mounted vfat ESP")

    def list_files(self) -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
        return sorted(out)

    def read(self, path: str) -> bytes | None:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, path: str, data: bytes | Path) -> None:
        dest = self.root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + TMP_SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if isinstance(data, bytes):
                    _write_all(fd, data)
                else:
                    with open(data, "rb") as src:
                        while chunk := src.read(1 << 20):
                            _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise EspFullError(f"{self.describe()}: full, cannot write {path} ({_size_of(data)} bytes, "
                                   f"{self.free_bytes()} free)") from err
            raise

    def remove(self, path: str) -> None:
        target = self.root / path
        target.unlink(missing_ok=True)
        if target.parent.exists():
            fsync_dir(target.parent)

    def remove_empty_dirs(self, path: str) -> None:
        current = self.root / path
        while current != self.root and current.is_dir() and not any(current.iterdir()):
            current.rmdir()
            current = current.parent

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def cluster_size(self) -> int:
        return os.statvfs(self.root).f_bsize or 4096


BLKFLSBUF = 0x1261  # <linux/fs.h>: _IO(0x12, 97), what ``blockdev --flushbufs`` issues


def drop_block_cache(path: Path) -> None:
    """Write out and forget the kernel's cached blocks of ``path`` when it is a block device (nothing otherwise).

    A disk and its partitions have page caches of their own: what was written through ``/dev/vda1`` is on the
    device, but a reader of ``/dev/vda`` that read the same blocks before still sees them as they were (and the
    other way round).  Every use of an ESP on a block device starts with this, so it reads the device.  Raises
    EspError when the kernel refuses (BLKFLSBUF needs CAP_SYS_ADMIN)."""
    try:
        if not stat.S_ISBLK(os.stat(path).st_mode):
            return
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # check() reports a missing or unreadable device in its own words
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as err:
        raise EspError(f"ESP {path}: cannot drop the kernel's cached blocks (BLKFLSBUF): {err.strerror}") from err
    finally:
        os.close(fd)


# -- a FAT filesystem inside an image or device, through mtools -----------------------------------------------------

@dataclass
class MtoolsEsp:
    image: Path
    offset: int = 0

    def describe(self) -> str:
        return f"ESP {self.image}@{self.offset}" if self.offset else f"ESP {self.image}"

    @property
    def _drive(self) -> str:
        return f"{self.image}@@{self.offset}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="0")
        try:
            proc = subprocess.run([args[0], "-i", self._drive, *args[1:]], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True)
        except FileNotFoundError as err:
            raise StonelabError(f"{args[0]}: not installed (Debian package mtools)") from err
        if check and proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip().splitlines()
            raise EspError(f"{self.describe()}: {args[0]} failed: {message[-1] if message else proc.returncode}")
        return proc

    def _head(self) -> bytes:
        try:
            with open(self.image, "rb") as img:
                img.seek(self.offset)
                return img.read(0x11000)
        except OSError as err:
            raise EspMissingError(f"{self.describe()}: cannot read: {err.strerror or err}") from err

    def check(self) -> None:
        if not self.image.exists():
            raise EspMissingError(f"{self.describe()}: no such image or device")
        drop_block_cache(self.image)
        foreign = foreign_filesystem(self._head())
        if foreign is not None:
            raise EspNotFatError(f"{self.describe()}: holds {foreign}, not a FAT filesystem")

    def _walk(self) -> list[str]:
        """Every path below the root, directories with a trailing '/'."""
        proc = self._run("mdir", "-/", "-b", "-a", "::/", check=False)
        if proc.returncode != 0:
            if b"not found" in proc.stderr and not proc.stdout.strip():
                return []   # mdir -/ -b reports an empty root directory as "not found"
            message = proc.stderr.decode(errors="replace").strip().splitlines()
            raise EspError(f"{self.describe()}: mdir failed: {message[-1] if message else proc.returncode}")
        return [line[3:] for line in proc.stdout.decode(errors="replace").splitlines() if line.startswith("::/")]

    def list_files(self) -> list[str]:
        return sorted(p for p in self._walk() if not p.endswith("/"))

    def _dirs(self) -> set[str]:
        return {p.rstrip("/").casefold() for p in self._walk() if p.endswith("/")}

    def read(self, path: str) -> bytes | None:
        proc = self._run("mcopy", "-n", f"::/{path}", "-", check=False)
        return proc.stdout if proc.returncode == 0 else None

    def _mkdirs(self, path: str) -> None:
        existing = self._dirs()
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub.casefold() not in existing:
                self._run("mmd", f"::/{sub}")

    def write_atomic(self, path: str, data: bytes | Path) -> None:
        self._mkdirs(path)
        tmp = f"{path}{TMP_SUFFIX}"
        with tempfile.TemporaryDirectory(prefix="stonelab-esp-") as scratch:
            source = data
            if isinstance(data, bytes):
                source = Path(scratch) / "data"
                source.write_bytes(data)
            proc = self._run("mcopy", "-o", "-n", str(source), f"::/{tmp}", check=False)
        if proc.returncode != 0:
            self._run("mdel", f"::/{tmp}", check=False)
            message = proc.stderr.decode(errors="replace")
            if "full" in message.lower() or "no free" in message.lower() or "space" in message.lower():
                raise EspFullError(f"{self.describe()}: full, cannot write {path} ({_size_of(data)} bytes, "
                                   f"{self.free_bytes()} free)")
            lines = message.strip().splitlines()
            raise EspError(f"{self.describe()}: mcopy {path} failed: {lines[-1] if lines else proc.returncode}")
        self._sync()
        # mren cannot replace: the destination is removed just before the rename (as blsforme does).
        self._run("mdel", f"::/{path}", check=False)
        self._run("mren", f"::/{tmp}", f"::/{path}")
        self._sync()

    def _sync(self) -> None:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        self._run("mdel", f"::/{path}", check=False)
        self._sync()

    def remove_empty_dirs(self, path: str) -> None:
        parts = path.split("/")
        while parts:
            proc = self._run("mdir", "-b", "-a", f"::/{'/'.join(parts)}", check=False)
            if proc.returncode != 0 or proc.stdout.strip():
                return
            self._run("mrd", f"::/{'/'.join(parts)}", check=False)
            parts.pop()
        self._sync()

    def free_bytes(self) -> int:
        proc = self._run("mdir", "-a", "::/")
        match = re.search(rb"([\d ]+) bytes free", proc.stdout)
        if not match:
            raise EspError(f"{self.describe()}: cannot read the free space from mdir")
        return int(match.group(1).replace(b" ", b""))

    def cluster_size(self) -> int:
        return _fat_cluster_size(self._head())


FAT32_MIN_CLUSTERS = 65525  # fewer clusters and the filesystem is FAT12/16, whatever its boot sector says


def fat32_sectors_per_cluster(size: int, sector: int = 512) -> int:
    """The largest cluster (1-64 sectors, a power of two) that still gives a ``size``-byte region at least
    ``FAT32_MIN_CLUSTERS`` clusters (with a margin for the reserved sectors and the two FATs).

    The FAT type is decided by the cluster count alone (Microsoft's FAT specification, "FAT type determination";
    mtools follows it): a FAT32 boot sector over too few clusters is read as FAT16 with a root directory of zero
    entries, and the first directory made in it fails with "No directory slots".  ``mkfs.vfat --offset`` on a whole
    disk image picks its cluster size from the size of the image, not of the region, so callers pass ``-s`` with
    this.  Raises ``EspError`` when even 1-sector clusters are too few (below ~33 MiB)."""
    sectors = size // sector
    for per_cluster in (64, 32, 16, 8, 4, 2, 1):
        if sectors // per_cluster >= FAT32_MIN_CLUSTERS * 102 // 100:
            return per_cluster
    raise EspError(f"a {size >> 20} MiB region is too small for FAT32 "
                   f"(at least {FAT32_MIN_CLUSTERS} clusters of {sector} bytes)")


def format_fat(image: Path, offset: int, size: int, label: str = "ESP") -> None:
    """mkfs.vfat a region of an image/device (FAT32 when big enough for it, else mkfs' choice)."""
    sectors = offset // 512
    blocks = size // 1024
    cmd = ["mkfs.vfat", "-n", label[:11]]
    if size >= 64 * 1024 * 1024:
        cmd += ["-F", "32", "-s", str(min(8, fat32_sectors_per_cluster(size)))]
    if offset:
        cmd += ["--offset", str(sectors)]
    cmd += [str(image), str(blocks)]
    try:
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise StonelabError("mkfs.vfat: not installed (Debian package dosfstools)") from err
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise EspError(f"ESP {image}: mkfs.vfat failed: {lines[-1] if lines else proc.returncode}")
