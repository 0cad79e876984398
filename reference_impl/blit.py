"""Blit: materialise a state's ``/usr`` in a directory from the content-addressed store.

Hard links by default (reflinks when the filesystem clones, copies after ``EXDEV`` — upstream #659), all with
``*at`` calls relative to a directory fd on the destination, so nothing outside it is ever touched.

- Parents before children: every directory is created (0755, or the layout's own mode) before anything in it.
- Empty files are created fresh: one shared empty inode would hit EMLINK on ext4 (upstream #372).  Any other
  link that hits EMLINK (an asset already linked 65,000 times) is copied instead.
- Regular files get ``mode & ~0o222``.  A hard link shares the asset's inode, so mode and owner are the asset's
  (upstream #785, #834).  The reference keeps canonical assets at 0444 owned by the store's owner and, for any
  other (mode, uid, gid), a *variant* ``<asset>.<mode>.<uid>.<gid>`` beside it, made once (content durable before
  its name appears) and reused by every later state; each file therefore gets exactly the mode and owner its
  layout asks for.  Without root, ownership that cannot be given is counted in ``ownership_ignored``.
- Device nodes, fifos and sockets are skipped, as upstream.
- RLIMIT_NOFILE is raised to its hard limit (upstream #841); the blit itself holds at most a few fds per worker.
- Files are placed by a few threads: ``link``/``open`` release the GIL, so the kernel work overlaps.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reference_impl import mutants
from reference_impl.stone import EMPTY_DIGEST, LayoutEntry, LayoutType
from reference_impl.fsutil import syncfs_fd
from reference_impl.store import ASSET_MODE, asset_path
from stonelab.errors import StonelabError

__all__ = ["BlitStrategy", "BlitOptions", "BlitReport", "blit", "raise_nofile_limit", "asset_path", "FICLONE"]

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_PARALLEL_FROM = 4000  # below this many entries threads cost more than they save
_CHUNK = 2048  # entries per task handed to a worker (consecutive entries share directories)
_DEFAULT_WORKERS = 2

_REGULAR = int(LayoutType.REGULAR)
_SYMLINK = int(LayoutType.SYMLINK)
_DIRECTORY = int(LayoutType.DIRECTORY)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class BlitStrategy(enum.Enum):
    AUTO = "auto"
    HARDLINK = "hardlink"
    REFLINK = "reflink"
    COPY = "copy"


@dataclass(frozen=True)
class BlitOptions:
    strategy: BlitStrategy = BlitStrategy.AUTO  # AUTO: reflink if FICLONE works, else hardlink; EXDEV -> copy
    workers: int = 0  # 0: choose (threads)
    fsync: bool = True  # one syncfs of the destination filesystem at the end
    on_halfway: Callable[[], None] | None = None  # called once, after about half the entries are placed
    owners: bool = True  # give files their layout's uid/gid; False: upstream's hard-link blit ignores them (#785)


@dataclass
class BlitReport:
    files: int = 0  # regular files, empty ones included
    directories: int = 0
    symlinks: int = 0
    empty: int = 0
    linked: int = 0
    reflinked: int = 0
    copied: int = 0
    variants: int = 0  # mode/owner variants created in the store by this blit
    skipped: int = 0  # device nodes, fifos, sockets, unknown types
    ownership_ignored: int = 0  # entries whose uid/gid could not be given (not root)
    seconds: float = 0.0
    strategy: BlitStrategy = BlitStrategy.HARDLINK  # the one used (COPY after an EXDEV switch)
    notes: list[str] = field(default_factory=list)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (upstream #841). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def blit(entries: Iterable[LayoutEntry], store: Path, dest: Path, options: BlitOptions = BlitOptions()) -> BlitReport:
    """Materialise ``entries`` (one per path, targets relative to /usr) under the existing, empty ``dest``.

    ``store`` is the assets directory (``<root>/.moss/assets/v2``).  User errors (a missing asset, a layout whose
    paths collide, a forced reflink the filesystem cannot do) raise a one-line :class:`StonelabError`.
    """
    started = time.monotonic()
    raise_nofile_limit()
    blitter = _Blitter(Path(store), Path(dest), options)
    try:
        report = blitter.run(entries)
    finally:
        blitter.close()
    report.seconds = time.monotonic() - started
    return report


def asset_str(store: str, digest: int) -> str:
    """``asset_path`` as a plain string, for the hot loop."""
    h = format(digest, "x")
    if len(h) < 10:
        return f"{store}/{h}"
    return f"{store}/{h[0:2]}/{h[2:4]}/{h[4:6]}/{h}"


def variant_str(asset: str, mode: int, uid: int, gid: int) -> str:
    return f"{asset}.{mode:o}.{uid}.{gid}"


class _Stop(Exception):
    """Another worker failed; this one gives up quietly."""


class _Blitter:
    def __init__(self, store: Path, dest: Path, options: BlitOptions):
        self.store = os.fspath(store)
        self.dest = os.fspath(dest)
        self.options = options
        self.report = BlitReport()
        self.lock = threading.Lock()
        self.failed = threading.Event()
        try:
            self.dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise StonelabError(f"{self.dest}: cannot open the blit destination: {os.strerror(err.errno)}") from None
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.root = self.euid == 0
        try:
            st = os.stat(self.store)
            self.store_owner = (st.st_uid, st.st_gid)
            self.store_dev = st.st_dev
        except OSError:
            self.store_owner = (self.euid, self.egid)
            self.store_dev = None
        self.umask = _current_umask()
        self.share_empty = mutants.active("hardlink-empty-files")
        # upstream (moss-compat) gives files no owner of their own: #785, open upstream
        self.keep_owners = options.owners and not mutants.active("ignore-owners")
        # a seeded bug: one shared inode whose mode the last file to link it sets, as upstream did before #834
        self.shared_mode = mutants.active("shared-inode-mode")
        # a seeded bug: EXDEV is an error, as it was upstream before #834 (#659)
        self.exdev_fails = mutants.active("no-exdev-fallback")
        # a seeded bug: one file descriptor left open per blitted file (upstream's regression fixed in #844, #841)
        self.leaked: list[int] | None = [] if mutants.active("leak-blit-fds") else None
        self.strategy = BlitStrategy.HARDLINK

    def close(self) -> None:
        os.close(self.dest_fd)

    # -- the whole blit -----------------------------------------------------------------------------------------
    def run(self, entries: Iterable[LayoutEntry]) -> BlitReport:
        report = self.report
        directories: dict[str, LayoutEntry] = {}
        others: list[LayoutEntry] = []  # regular files and symlinks, in the caller's order
        sample: LayoutEntry | None = None
        for entry in entries:
            kind = entry.file_type
            if kind == _REGULAR:
                if entry.digest is None:
                    raise StonelabError(f"/usr/{entry.target}: regular file without a digest in the layout")
                if sample is None and entry.digest != EMPTY_DIGEST:
                    sample = entry
                others.append(entry)
            elif kind == _SYMLINK:
                others.append(entry)
            elif kind == _DIRECTORY:
                if entry.target in directories:
                    raise StonelabError(f"/usr/{entry.target}: appears twice in the layout")
                directories[entry.target] = entry
            else:
                report.skipped += 1
        self.strategy = self._choose_strategy(sample)  # first: a refused reflink leaves dest untouched
        report.strategy = self.strategy
        workers = self.options.workers or (_DEFAULT_WORKERS if len(others) >= _PARALLEL_FROM else 1)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blit") if workers > 1 else None
        try:
            created = self._make_directories(directories, others, pool)
            if self.strategy is BlitStrategy.HARDLINK:
                self._make_variants(others, pool)
            half = len(others) // 2
            self._tasks(pool, self._place_chunk, others, 0, half, _CHUNK)
            self._halfway()
            self._tasks(pool, self._place_chunk, others, half, len(others), _CHUNK)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._finish_directories(created, directories)
        if self.options.fsync:
            syncfs_fd(self.dest_fd, self.dest)
        return report

    def _halfway(self) -> None:
        if self.options.on_halfway is not None:
            self.options.on_halfway()

    def _tasks(self, pool: ThreadPoolExecutor | None, work: Callable[[list, int, int], None], items: list,
               start: int, stop: int, chunk: int) -> None:
        """``work(items, lo, hi)`` over [start, stop) in chunks, on the pool when there is one; the first
        failure stops the rest and is raised."""
        if pool is None or stop - start <= chunk:
            work(items, start, stop)
            return
        futures = [pool.submit(work, items, lo, min(lo + chunk, stop)) for lo in range(start, stop, chunk)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            self.failed.set()
            for future in futures:
                future.cancel()
            raise

    # -- directories ---------------------------------------------------------------------------------------------
    def _make_directories(self, explicit: dict[str, LayoutEntry], others: list[LayoutEntry],
                          pool: ThreadPoolExecutor | None) -> list[str]:
        """Create every directory (explicit ones and all parents) in sorted order: a parent sorts before its
        children because it is a prefix of them.  Returns the created paths in that order."""
        needed = set(explicit)
        for entry in others:
            parent = entry.target.rpartition("/")[0]
            while parent and parent not in needed:
                needed.add(parent)
                parent = parent.rpartition("/")[0]
        for entry in explicit.values():
            parent = entry.target.rpartition("/")[0]
            while parent and parent not in needed:
                needed.add(parent)
                parent = parent.rpartition("/")[0]
        self._check_collisions(needed, others)
        order = sorted(needed)
        levels: dict[int, list[tuple[str, int]]] = {}
        for target in order:
            entry = explicit.get(target)
            mode = 0o755 if entry is None else (stat.S_IMODE(entry.mode) & 0o777) | 0o700
            levels.setdefault(target.count("/"), []).append((target, mode))
        for depth in sorted(levels):  # a level's parents all exist: its directories can be made in parallel
            self._tasks(pool, self._mkdir_range, levels[depth], 0, len(levels[depth]), 256)
        self.report.directories += len(order)
        return order

    def _mkdir_range(self, items: list[tuple[str, int]], start: int, stop: int) -> None:
        if self.failed.is_set():
            raise _Stop
        fd = self.dest_fd
        mkdir = os.mkdir
        for i in range(start, stop):
            target, mode = items[i]
            try:
                mkdir(target, mode, dir_fd=fd)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(target, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise StonelabError(f"{self.dest}/{target}: exists and is not a directory") from None

    def _check_collisions(self, directories: set[str], others: list[LayoutEntry]) -> None:
        seen: set[str] = set()
        for entry in others:
            target = entry.target
            if target in directories:
                raise StonelabError(f"/usr/{target}: is a {_label(entry)} in the layout but also a directory")
            if target in seen:
                raise StonelabError(f"/usr/{target}: appears twice in the layout")
            seen.add(target)

    def _finish_directories(self, order: list[str], explicit: dict[str, LayoutEntry]) -> None:
        """Give directories their final mode and owner, children first (a parent may become read-only)."""
        umask = self.umask
        for target in reversed(order):
            entry = explicit.get(target)
            if entry is None:
                mode, uid, gid = 0o755, self.euid, self.egid
                created_mode = 0o755 & ~umask
            else:
                mode = stat.S_IMODE(entry.mode)
                uid, gid = self._owner(entry)
                if (uid, gid) != (entry.uid, entry.gid):
                    self.report.ownership_ignored += 1
                created_mode = ((mode & 0o777) | 0o700) & ~umask
            if mode == created_mode and (uid, gid) == (self.euid, self.egid):
                continue
            dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dest_fd)
            try:
                _own(dfd, mode, uid, gid, self.euid, self.egid)
            finally:
                os.close(dfd)

    # -- strategy --------------------------------------------------------------------------------------------------
    def _choose_strategy(self, sample: LayoutEntry | None) -> BlitStrategy:
        requested = self.options.strategy
        if requested is BlitStrategy.COPY:
            return requested
        dest_dev = os.fstat(self.dest_fd).st_dev
        if requested is BlitStrategy.REFLINK:
            if sample is not None:
                works, reason = self._probe_reflink(sample)
                if not works:
                    raise StonelabError(f"{self.dest}: cannot blit with reflinks: {reason}")
            return requested
        if self.store_dev is not None and self.store_dev != dest_dev and not self.exdev_fails:
            self._note_exdev()
            return BlitStrategy.COPY
        if requested is BlitStrategy.AUTO and sample is not None and self._probe_reflink(sample)[0]:
            return BlitStrategy.REFLINK
        return BlitStrategy.HARDLINK

    def _probe_reflink(self, sample: LayoutEntry) -> tuple[bool, str]:
        """Clone one real asset into a scratch file in the destination: exactly what the blit would do."""
        source = asset_str(self.store, sample.digest)
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StonelabError(f"{source}: missing asset for /usr/{sample.target}") from None
        probe = f".stonelab-reflink-probe.{os.getpid()}"
        try:
            dst = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=self.dest_fd)
            try:
                fcntl.ioctl(dst, FICLONE, src)
                return True, "FICLONE works"
            except OSError as err:
                if err.errno == errno.EXDEV:
                    return False, "the store is on another filesystem"
                return False, f"the filesystem cannot reflink (FICLONE: {os.strerror(err.errno)})"
            finally:
                os.close(dst)
                os.unlink(probe, dir_fd=self.dest_fd)
        finally:
            os.close(src)

    def _note_exdev(self) -> None:
        with self.lock:
            self.strategy = BlitStrategy.COPY
            self.report.strategy = BlitStrategy.COPY
            note = "EXDEV: the store is on another filesystem than the destination; copying, not linking (#659)"
            if note not in self.report.notes:
                self.report.notes.append(note)

    # -- ownership ---------------------------------------------------------------------------------------------
    def _owner(self, entry: LayoutEntry) -> tuple[int, int]:
        """The uid/gid this process can give the entry: the layout's as root, otherwise our own."""
        if self.root:
            return entry.uid, entry.gid
        return self.euid, self.egid

    def _file_owner(self, entry: LayoutEntry) -> tuple[int, int]:
        """For regular files: without root the store owner's (a link to the canonical asset) when asked for."""
        if not self.keep_owners:
            return self.store_owner
        if self.root:
            return entry.uid, entry.gid
        wanted = (entry.uid, entry.gid)
        return wanted if wanted == self.store_owner else (self.euid, self.egid)

    # -- variants (#785/#834) ------------------------------------------------------------------------------------
    def _make_variants(self, others: list[LayoutEntry], pool: ThreadPoolExecutor | None) -> None:
        """Create the missing ``<asset>.<mode>.<uid>.<gid>`` files this tree links to."""
        canonical = (ASSET_MODE, *self.store_owner)
        needed: dict[tuple[int, int, int, int], str] = {}
        for entry in others:
            if entry.file_type != _REGULAR or entry.digest == EMPTY_DIGEST:
                continue
            key = (ASSET_MODE if self.shared_mode else stat.S_IMODE(entry.mode) & ~0o222, *self._file_owner(entry))
            if key != canonical:
                needed.setdefault((entry.digest, *key), entry.target)
        todo: list[tuple[str, str, int, int, int, str]] = []
        for (digest, mode, uid, gid), target in needed.items():
            asset = asset_str(self.store, digest)
            variant = variant_str(asset, mode, uid, gid)
            if not self._variant_ok(asset, variant, mode, uid, gid):
                todo.append((asset, variant, mode, uid, gid, target))
        if not todo:
            return
        self._tasks(pool, self._write_variant_parts, todo, 0, len(todo), 64)
        # The content must be durable before the name appears: a variant is trusted by every later state.
        store_fd = os.open(self.store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs_fd(store_fd, self.store)
        finally:
            os.close(store_fd)
        for _asset, variant, *_rest in todo:
            os.rename(variant + ".part", variant)
        self.report.variants += len(todo)

    @staticmethod
    def _variant_ok(asset: str, variant: str, mode: int, uid: int, gid: int) -> bool:
        try:
            st = os.lstat(variant)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (uid, gid):
            return False
        try:
            return os.lstat(asset).st_size == st.st_size
        except FileNotFoundError:
            return False

    def _write_variant_parts(self, todo: list, start: int, stop: int) -> None:
        if self.failed.is_set():
            raise _Stop
        for i in range(start, stop):
            self._write_variant_part(*todo[i])

    def _write_variant_part(self, asset: str, variant: str, mode: int, uid: int, gid: int, target: str) -> None:
        self._write(asset, target, mode, uid, gid, reflink=True, part=variant + ".part")

    # -- files and symlinks ----------------------------------------------------------------------------------
    def _place_chunk(self, items: list[LayoutEntry], start: int, stop: int) -> None:
        if self.failed.is_set():
            raise _Stop
        fd = self.dest_fd
        store = self.store
        link = os.link
        root = self.root
        store_owner = self.store_owner
        me = (self.euid, self.egid)
        counts = {"files": 0, "empty": 0, "linked": 0, "reflinked": 0, "copied": 0, "symlinks": 0,
                  "ownership_ignored": 0}
        for i in range(start, stop):
            entry = items[i]
            target = entry.target
            uid, gid = entry.uid, entry.gid
            if not root and (uid, gid) != me and (uid, gid) != store_owner:
                counts["ownership_ignored"] += 1
                uid, gid = me
            if entry.file_type == _SYMLINK:
                self._symlink(entry, uid, gid)
                counts["symlinks"] += 1
                continue
            counts["files"] += 1
            digest = entry.digest
            mode = entry.mode & 0o7555  # & 0o7777 & ~0o222
            if not self.keep_owners:
                uid, gid = store_owner
            if digest == EMPTY_DIGEST and not self.share_empty:
                self._empty(target, mode, uid, gid)
                counts["empty"] += 1
                continue
            source = asset_str(store, digest)
            if self.strategy is BlitStrategy.HARDLINK:
                linked = source if (mode == ASSET_MODE or self.shared_mode) and (uid, gid) == store_owner else \
                    f"{source}.{mode:o}.{uid}.{gid}"
                try:
                    link(linked, target, dst_dir_fd=fd, follow_symlinks=False)
                    if self.shared_mode and linked == source:
                        os.chmod(source, mode)
                    if self.leaked is not None:
                        self.leaked.append(os.open(target, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd))
                    counts["linked"] += 1
                    continue
                except FileNotFoundError:
                    raise StonelabError(f"{source}: missing asset for /usr/{target}") from None
                except OSError as err:
                    if err.errno == errno.EXDEV and not self.exdev_fails:
                        self._note_exdev()
                    elif err.errno != errno.EMLINK:  # EMLINK: 65,000 links on ext4; this one gets a copy
                        raise
            how = self._write(source, target, mode, uid, gid, reflink=self.strategy is BlitStrategy.REFLINK)
            counts[how] += 1
        with self.lock:
            for name, count in counts.items():
                setattr(self.report, name, getattr(self.report, name) + count)

    def _symlink(self, entry: LayoutEntry, uid: int, gid: int) -> None:
        if entry.source is None:
            raise StonelabError(f"/usr/{entry.target}: symlink without a destination in the layout")
        os.symlink(entry.source, entry.target, dir_fd=self.dest_fd)
        if (uid, gid) != (self.euid, self.egid):
            try:
                os.chown(entry.target, uid, gid, dir_fd=self.dest_fd, follow_symlinks=False)
            except PermissionError:
                pass  # not root: counted in ownership_ignored

    def _empty(self, target: str, mode: int, uid: int, gid: int) -> None:
        fd = os.open(target, _NEW_FILE, mode & 0o777, dir_fd=self.dest_fd)
        try:
            if mode & self.umask or mode & 0o7000 or (uid, gid) != (self.euid, self.egid):
                _own(fd, mode, uid, gid, self.euid, self.egid)
        finally:
            os.close(fd)

    def _write(self, source: str, target: str, mode: int, uid: int, gid: int, *, reflink: bool,
               part: str | None = None) -> str:
        """Clone or copy an asset into a new file: ``target`` under ``dest``, or ``part`` (a variant being made)."""
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StonelabError(f"{source}: missing asset for /usr/{target}") from None
        try:
            if part is None:
                dst = os.open(target, _NEW_FILE, 0o600, dir_fd=self.dest_fd)
            else:
                dst = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                how = "copied"
                if reflink:
                    try:
                        fcntl.ioctl(dst, FICLONE, src)
                        how = "reflinked"
                    except OSError:
                        _copy_fd(src, dst)
                else:
                    _copy_fd(src, dst)
                _own(dst, mode, uid, gid, self.euid, self.egid)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return how


def _label(entry: LayoutEntry) -> str:
    try:
        return LayoutType(entry.file_type).label
    except ValueError:
        return f"type-{entry.file_type} entry"


def _own(fd: int, mode: int, uid: int, gid: int, euid: int, egid: int) -> None:
    if (uid, gid) != (euid, egid):
        try:
            os.fchown(fd, uid, gid)
        except PermissionError:
            pass  # not root: the caller counted it in ownership_ignored
    os.fchmod(fd, mode)  # after fchown, which clears set-id bits


def _copy_fd(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(src, dst, size - offset)
            if copied == 0:
                break
            offset += copied
        return
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while offset < size:  # copy_file_range refused: sendfile continues where it stopped
        sent = os.sendfile(dst, src, offset, size - offset)
        if sent == 0:
            break
        offset += sent


def _current_umask() -> int:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
