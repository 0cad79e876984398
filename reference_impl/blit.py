"""Blit: materialise a state's ``/usr`` in a directory from the content-addressed store.

Hard links by default (reflinks when the filesystem clones, copies after ``EXDEV`` — upstream #659), all with
``*at`` calls relative to a directory fd on the destination, so nothing outside it is ever touched.

- Empty files are created fresh: one shared empty inode would hit EMLINK on ext4 (upstream #372).
- Regular files get ``mode & ~0o222``.  A hard link shares the asset's inode, so mode and owner are the asset's
  (upstream #785, #834).  The reference keeps canonical assets at 0444 owned by the store's owner and, for any
  other (mode, uid, gid), a *variant* ``<asset>.<mode>.<uid>.<gid>`` beside it, made once and reused by every
  later state; each file therefore gets exactly the mode and owner its layout asks for.
- Device nodes, fifos and sockets are skipped, as upstream.
- RLIMIT_NOFILE is raised to its hard limit (upstream #841).
"""
from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import resource
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reference_impl.stone import EMPTY_DIGEST, LayoutEntry, LayoutType
from reference_impl.store import ASSET_MODE, asset_path
from stonelab.errors import StonelabError

FICLONE = 0x40049409
_PARALLEL_FROM = 2000  # below this many files threads cost more than they save


class BlitStrategy(enum.Enum):
    AUTO = "auto"
    HARDLINK = "hardlink"
    REFLINK = "reflink"
    COPY = "copy"


@dataclass(frozen=True)
class BlitOptions:
    strategy: BlitStrategy = BlitStrategy.AUTO
    workers: int = 0  # 0: choose
    fsync: bool = True  # one syncfs of the destination filesystem at the end
    on_halfway: Callable[[], None] | None = None


@dataclass
class BlitReport:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    empty: int = 0
    linked: int = 0
    reflinked: int = 0
    copied: int = 0
    variants: int = 0
    skipped: int = 0
    ownership_ignored: int = 0
    seconds: float = 0.0
    strategy: BlitStrategy = BlitStrategy.HARDLINK
    notes: list[str] = field(default_factory=list)


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True)
class _File:
    target: str
    source: str  # asset (or variant) path
    digest: int
    mode: int  # permission bits wanted
    uid: int
    gid: int


class _Blitter:
    def __init__(self, store: Path, dest: Path, options: BlitOptions):
        self.store = store
        self.options = options
        self.report = BlitReport()
        self.lock = threading.Lock()
        self.dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dest = dest
        self.is_root = os.geteuid() == 0
        st = os.stat(store) if store.is_dir() else None
        self.store_owner = (st.st_uid, st.st_gid) if st else (os.geteuid(), os.getegid())
        self.strategy = self._choose(options.strategy)
        self.report.strategy = self.strategy

    def close(self) -> None:
        os.close(self.dest_fd)

    # -- strategy ----------------------------------------------------------------------------------------------
    def _choose(self, requested: BlitStrategy) -> BlitStrategy:
        if requested in (BlitStrategy.HARDLINK, BlitStrategy.COPY):
            return requested
        works, reason = self._probe_reflink()
        if requested is BlitStrategy.REFLINK and not works:
            raise StonelabError(f"{self.dest}: --blit reflink: {reason}")
        return BlitStrategy.REFLINK if works else BlitStrategy.HARDLINK

    def _probe_reflink(self) -> tuple[bool, str]:
        probe_src = self.store / ".reflink-probe"
        probe_dst = ".reflink-probe"
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            probe_src.write_bytes(b"probe")
            with open(probe_src, "rb") as src:
                fd = os.open(probe_dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self.dest_fd)
                try:
                    fcntl.ioctl(fd, FICLONE, src.fileno())
                finally:
                    os.close(fd)
            return True, "FICLONE works"
        except OSError as err:
            return False, f"the filesystem cannot reflink (FICLONE: {os.strerror(err.errno)})"
        finally:
            probe_src.unlink(missing_ok=True)
            try:
                os.unlink(probe_dst, dir_fd=self.dest_fd)
            except FileNotFoundError:
                pass

    # -- the walk ----------------------------------------------------------------------------------------------
    def run(self, entries: Iterable[LayoutEntry]) -> BlitReport:
        directories: dict[str, int] = {}
        files: list[_File] = []
        empties: list[LayoutEntry] = []
        links: list[LayoutEntry] = []
        for entry in entries:
            kind = entry.file_type
            if kind is LayoutType.DIRECTORY:
                directories[entry.target] = stat.S_IMODE(entry.mode) or 0o755
            elif kind is LayoutType.REGULAR:
                if entry.digest == EMPTY_DIGEST:
                    empties.append(entry)
                else:
                    files.append(self._file(entry))
            elif kind is LayoutType.SYMLINK:
                links.append(entry)
            else:
                self.report.skipped += 1
        self._make_directories(directories, [*files, *empties, *links])
        half = len(files) // 2
        self._files(files[:half])
        if self.options.on_halfway is not None:
            self.options.on_halfway()
        self._files(files[half:])
        for entry in empties:
            self._empty(entry)
        for entry in links:
            os.symlink(entry.source or "", entry.target, dir_fd=self.dest_fd)
            self.report.symlinks += 1
        for target, mode in sorted(directories.items(), key=lambda kv: -kv[0].count("/")):
            if mode != 0o755:
                os.chmod(target, mode, dir_fd=self.dest_fd, follow_symlinks=False)
        if self.options.fsync:
            _syncfs(self.dest_fd)
        return self.report

    def _file(self, entry: LayoutEntry) -> _File:
        mode = stat.S_IMODE(entry.mode) & ~0o222
        uid, gid = entry.uid, entry.gid
        if not self.is_root and (uid, gid) != self.store_owner:
            uid, gid = self.store_owner
            self.report.ownership_ignored += 1
        return _File(entry.target, os.fspath(asset_path(self.store, entry.digest)), entry.digest, mode, uid, gid)

    def _make_directories(self, explicit: dict[str, int], children: list) -> None:
        needed = set(explicit)
        for item in children:
            parent = item.target.rpartition("/")[0]
            while parent and parent not in needed:
                needed.add(parent)
                parent = parent.rpartition("/")[0]
        for target in sorted(needed, key=lambda t: (t.count("/"), t)):
            try:
                os.mkdir(target, 0o755, dir_fd=self.dest_fd)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(target, dir_fd=self.dest_fd, follow_symlinks=False).st_mode):
                    raise StonelabError(f"{self.dest}/{target}: exists and is not a directory") from None
            self.report.directories += 1

    def _files(self, files: list[_File]) -> None:
        if not files:
            return
        workers = self.options.workers or (min(4, (os.cpu_count() or 1) * 2) if len(files) >= _PARALLEL_FROM else 1)
        if workers <= 1:
            self._place_all(files)
            return
        step = max(1, len(files) // (workers * 8))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blit") as pool:
            for future in [pool.submit(self._place_all, files[i:i + step]) for i in range(0, len(files), step)]:
                future.result()

    def _place_all(self, files: list[_File]) -> None:
        counts: dict[str, int] = {}
        for item in files:
            how = self._place(item)
            counts[how] = counts.get(how, 0) + 1
        with self.lock:
            self.report.files += len(files)
            for how, count in counts.items():
                setattr(self.report, how, getattr(self.report, how) + count)

    def _place(self, item: _File) -> str:
        if self.strategy is BlitStrategy.HARDLINK:
            source = self._source_for_link(item)
            try:
                os.link(source, item.target, dst_dir_fd=self.dest_fd, follow_symlinks=False)
                return "linked"
            except FileNotFoundError:
                if not os.path.exists(source):
                    raise StonelabError(f"{source}: missing asset for /usr/{item.target}") from None
                raise
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                self.strategy = BlitStrategy.COPY  # upstream #659: store and root on different filesystems
                self.report.strategy = BlitStrategy.COPY
                with self.lock:
                    if not self.report.notes:
                        self.report.notes.append("EXDEV: the store is on another filesystem; copying, not linking")
        return self._write_copy(item, reflink=self.strategy is BlitStrategy.REFLINK)

    def _source_for_link(self, item: _File) -> str:
        if item.mode == ASSET_MODE and (item.uid, item.gid) == self.store_owner:
            return item.source
        variant = f"{item.source}.{item.mode:o}.{item.uid}.{item.gid}"
        if not os.path.exists(variant):
            self._make_variant(item, variant)
        return variant

    def _make_variant(self, item: _File, variant: str) -> None:
        part = f"{variant}.part.{os.getpid()}.{id(item)}"
        try:
            with open(item.source, "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                os.fchmod(dst.fileno(), item.mode)
                if (item.uid, item.gid) != (os.geteuid(), os.getegid()):
                    os.fchown(dst.fileno(), item.uid, item.gid)
                    os.fchmod(dst.fileno(), item.mode)  # chown clears set-id bits
                if self.options.fsync:
                    os.fsync(dst.fileno())
        except FileNotFoundError:
            raise StonelabError(f"{item.source}: missing asset for /usr/{item.target}") from None
        os.rename(part, variant)
        with self.lock:
            self.report.variants += 1

    def _write_copy(self, item: _File, *, reflink: bool) -> str:
        try:
            src = os.open(item.source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StonelabError(f"{item.source}: missing asset for /usr/{item.target}") from None
        try:
            dst = os.open(item.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=self.dest_fd)
            try:
                if reflink:
                    fcntl.ioctl(dst, FICLONE, src)
                    how = "reflinked"
                else:
                    size = os.fstat(src).st_size
                    while size > 0:
                        copied = os.copy_file_range(src, dst, size)
                        if copied == 0:
                            break
                        size -= copied
                    how = "copied"
                self._own(dst, item.mode, item.uid, item.gid)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return how

    def _empty(self, entry: LayoutEntry) -> None:
        fd = os.open(entry.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.dest_fd)
        try:
            uid, gid = entry.uid, entry.gid
            if not self.is_root:
                uid, gid = os.geteuid(), os.getegid()
            self._own(fd, stat.S_IMODE(entry.mode) & ~0o222, uid, gid)
        finally:
            os.close(fd)
        self.report.files += 1
        self.report.empty += 1

    @staticmethod
    def _own(fd: int, mode: int, uid: int, gid: int) -> None:
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)


def _syncfs(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def blit(entries: Iterable[LayoutEntry], store: Path, dest: Path, options: BlitOptions = BlitOptions()) -> BlitReport:
    """Materialise ``entries`` (one per path, targets relative to /usr) under the existing directory ``dest``."""
    started = time.monotonic()
    raise_nofile_limit()
    blitter = _Blitter(store, dest, options)
    try:
        report = blitter.run(entries)
    finally:
        blitter.close()
    report.seconds = time.monotonic() - started
    return report
