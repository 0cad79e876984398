"""Write a package's unique files out of the Content stream, verified, with bounded memory.

The calling thread only decompresses: it fills a small pool of fixed blocks (``blocks`` x ``block_size``
bytes, the whole memory bound) straight from the zstd stream.  Files are handed to writer threads in batches as
views into those blocks (two views for a file that straddles a block boundary), so nothing is copied on the
way; the writers hash each file (XXH3-128) and only then write it.  A block goes back to the pool once the
decoder and every batch that holds it are done.  A file larger than a block goes to one writer piece by piece,
as the blocks fill.

A file in a block is hashed before it is created; a streamed one is written as it comes.  Either way it is
written unnamed (O_TMPFILE, or ``<name>.part`` where the filesystem has none) and given its name only after its
digest checked out (a failed one is removed), so a crash or a corrupt package never leaves a wrong file under a
final name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import xxhash

from reference_impl.stone.model import IndexEntry
from reference_impl.stone.reader import ContentStream, StoneFile


@dataclass(frozen=True)
class ExtractOptions:
    writers: int = 2
    # Small blocks stay in the CPU caches between the decoder writing them and a writer reading them: 1 MiB
    # blocks took 7-10 % less CPU than 8 MiB ones in bench/stone.py.  A larger file goes to a writer piece by piece.
    block_size: int = 2**20
    blocks: int = 16
    batch_files: int = 32  # files per writer job, so writers share a block of small files
    fsync: bool = False
    mode: int = 0o644


def flat_path(dest: Path) -> Callable[[int], str]:
    """``dest/<32 hex>``: easy to read, but every create contends for one directory lock."""
    base = os.fspath(dest)
    return lambda digest: f"{base}/{digest:032x}"


def fanout_path(dest: Path) -> Callable[[int], str]:
    """``dest/<h[0:2]>/<h[2:4]>/<32 hex>``: creates in different directories proceed in parallel."""
    base = os.fspath(dest)

    def path_for(digest: int) -> str:
        name = f"{digest:032x}"
        return f"{base}/{name[:2]}/{name[2:4]}/{name}"
    return path_for


class _Namer:
    """Gives files their names once complete.  Where the filesystem has O_TMPFILE a file is an unnamed inode until
    it is linked in (a crash leaves nothing behind, and ext4 does one directory update instead of two: ~25 % less
    CPU per file with two writers); elsewhere it is ``<name>.part``, renamed into place."""

    UNSUPPORTED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}

    def __init__(self) -> None:
        try:
            self.proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.proc_fds = -1  # no /proc: linkat cannot name an open file without privileges
        self.unnamed = self.proc_fds >= 0

    def open_unnamed(self, directory: str, mode: int) -> int:
        """An O_TMPFILE fd in ``directory``, or -1 where that is not supported."""
        if not self.unnamed:
            return -1
        try:
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
        except OSError as err:
            if err.errno in self.UNSUPPORTED:
                self.unnamed = False  # for every later file too; the fd stays open for writers still linking
                return -1
            raise

    def link(self, fd: int, final: str) -> None:
        try:
            os.link(str(fd), final, src_dir_fd=self.proc_fds, follow_symlinks=True)
        except FileExistsError:  # replace what is there, atomically
            part = final + ".part"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            os.link(str(fd), part, src_dir_fd=self.proc_fds, follow_symlinks=True)
            os.rename(part, final)

    def close(self) -> None:
        """Once no writer is left."""
        if self.proc_fds >= 0:
            os.close(self.proc_fds)
            self.proc_fds = -1


class _FileWriter:
    """A new file for ``final``: written, synced if asked, then named ``final`` — or removed on failure."""

    def __init__(self, final: str, options: ExtractOptions, namer: _Namer):
        self.final = final
        self.options = options
        self.namer = namer
        self.part: str | None = None
        try:
            self.fd = self._open()
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            self.fd = self._open()

    def _open(self) -> int:
        fd = self.namer.open_unnamed(os.path.dirname(self.final), self.options.mode)
        if fd >= 0:
            return fd
        self.part = self.final + ".part"
        return os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.options.mode)

    def write(self, *pieces: memoryview) -> None:
        written = os.writev(self.fd, pieces)
        for piece in pieces:  # the rest of a short write, if any
            if written >= len(piece):
                written -= len(piece)
                continue
            piece = piece[written:]
            written = 0
            while piece:
                piece = piece[os.write(self.fd, piece):]

    def commit(self) -> None:
        try:
            if self.options.fsync:
                os.fsync(self.fd)
            if self.part is None:
                self.namer.link(self.fd, self.final)
            os.close(self.fd)
            self.fd = -1
            if self.part is not None:
                os.rename(self.part, self.final)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part or self.final + ".part")


class _Block:
    """One buffer of the pool; back in the pool when the decoder and every batch holding it let go."""

    def __init__(self, size: int, pool: queue.SimpleQueue[_Block]):
        self.view = memoryview(bytearray(size))
        self.start = 0  # stream offset of view[0]
        self.end = 0  # stream offset just past the filled part
        self._holders = 0
        self._lock = threading.Lock()
        self._pool = pool

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            free = self._holders == 0
        if free:
            self._pool.put(self)

    def slice(self, entry: IndexEntry) -> memoryview:
        return self.view[entry.start - self.start: entry.end - self.start]


class _Item(NamedTuple):
    """A file for a writer: its bytes are ``pieces`` (one view, or two across a block boundary)."""

    entry: IndexEntry
    pieces: tuple[memoryview, ...]


class _Extraction:
    def __init__(self, stone: StoneFile, content: ContentStream, pool: ThreadPoolExecutor, options: ExtractOptions,
                 path_for: Callable[[int], str | os.PathLike[str]]):
        self.stone = stone
        self.path_for = path_for  # called by the writers: the decoding thread is the one to spare
        self.content = content
        self.executor = pool
        self.options = options
        self.free: queue.SimpleQueue[_Block] = queue.SimpleQueue()
        self.unallocated = max(options.blocks, 2)
        # a small package gets small blocks: a fresh block costs page faults for every byte of it
        self.block_size = max(1, min(options.block_size, content.payload.plain_size))
        self.block: _Block | None = None
        self.batch: list[_Item] = []
        self.batch_blocks: list[_Block] = []  # the blocks the batch holds, each once
        self.pending: list[Future] = []
        self.failed = threading.Event()  # a writer failed: stop decompressing at the next block
        self.namer = _Namer()

    def advance(self) -> None:
        """The current block is done with: fill the next one with the stream that follows."""
        if self.failed.is_set():
            self.pending = _reap(self.pending)
        old = self.block
        if old is not None:
            self.submit()  # the pending batch may hold every other block
            old.release()
        block = self.take_block()
        block.hold()
        block.start = self.content.position
        fresh = self.content.readinto(block.view)
        block.end = block.start + fresh
        self.block = block
        if old is not None and not fresh:
            raise self.stone.error("the index points past the end of the content stream", self.content.payload,
                                   self.content.payload.offset + 8)

    def take_block(self) -> _Block:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.unallocated:
                self.unallocated -= 1
                return _Block(self.block_size, self.free)
            return self.free.get()

    def add(self, entry: IndexEntry) -> None:
        """Queue a file that lies in the current block or straddles it and the next one (then fetched here)."""
        block = self.block
        if entry.end <= block.end:
            self.hold_for_batch(block)
            pieces = (block.slice(entry),)
        else:
            head = block.view[entry.start - block.start: block.end - block.start]
            block.hold()  # keeps the head alive across the refill
            self.advance()
            self.batch_blocks.append(block)  # the next batch takes that hold over
            self.hold_for_batch(self.block)
            pieces = (head, self.block.view[: entry.end - self.block.start])
        self.batch.append(_Item(entry, pieces))
        if len(self.batch) >= self.options.batch_files:
            self.submit()

    def hold_for_batch(self, block: _Block) -> None:
        if not self.batch_blocks or self.batch_blocks[-1] is not block:
            block.hold()
            self.batch_blocks.append(block)

    def submit(self) -> None:
        if not self.batch:
            return
        batch, blocks = self.batch, self.batch_blocks
        self.batch, self.batch_blocks = [], []
        try:
            self.pending.append(self.executor.submit(self.write_batch, batch, blocks))
        except BaseException:
            _release(blocks)
            raise
        if len(self.pending) > 64 or self.failed.is_set():
            self.pending = _reap(self.pending)  # re-raises a writer's error here

    def write_batch(self, batch: list[_Item], blocks: list[_Block]) -> None:
        try:
            for item in batch:
                hasher = xxhash.xxh3_128()
                for piece in item.pieces:
                    hasher.update(piece)
                if hasher.intdigest() != item.entry.digest:
                    raise self.stone.digest_mismatch(item.entry)
                writer = _FileWriter(os.fspath(self.path_for(item.entry.digest)), self.options, self.namer)
                try:
                    writer.write(*item.pieces)
                except BaseException:
                    writer.abandon()
                    raise
                writer.commit()
        except BaseException:
            self.failed.set()
            raise
        finally:
            _release(blocks)

    def stream_large(self, entry: IndexEntry) -> None:
        """A file larger than a block: a writer takes its pieces from a queue as the blocks fill."""
        self.submit()
        pieces: queue.SimpleQueue[tuple[memoryview, _Block] | None] = queue.SimpleQueue()
        self.pending.append(self.executor.submit(self.write_streamed, entry, pieces))
        try:
            position = entry.start
            while True:
                block = self.block
                piece = block.view[position - block.start: min(entry.end, block.end) - block.start]
                block.hold()
                pieces.put((piece, block))
                position += len(piece)
                if position == entry.end:
                    break
                self.advance()
        finally:
            pieces.put(None)  # also when the stream failed: the writer then drops the file

    def write_streamed(self, entry: IndexEntry,
                       pieces: queue.SimpleQueue[tuple[memoryview, _Block] | None]) -> None:
        hasher = xxhash.xxh3_128()
        received = 0
        writer: _FileWriter | None = None
        try:
            writer = _FileWriter(os.fspath(self.path_for(entry.digest)), self.options, self.namer)
            while (item := pieces.get()) is not None:
                piece, block = item
                try:
                    hasher.update(piece)
                    writer.write(piece)
                    received += len(piece)
                finally:
                    block.release()
        except BaseException:
            self.failed.set()
            while (item := pieces.get()) is not None:  # the decoder may wait for these blocks
                item[1].release()
            if writer is not None:
                writer.abandon()
            raise
        if received != entry.size:  # the decoder stopped; its error is the one reported
            writer.abandon()
        elif hasher.intdigest() != entry.digest:
            self.failed.set()
            writer.abandon()
            raise self.stone.digest_mismatch(entry)
        else:
            writer.commit()

    def finish(self, *, write: bool = True) -> None:
        if write:
            self.submit()
        else:
            _release(self.batch_blocks)
            self.batch, self.batch_blocks = [], []
        if self.block is not None:
            self.block.release()
            self.block = None

    def close(self) -> None:
        """Empty the pool (blocks and pool refer to each other: the memory goes back now, not at the next GC)."""
        self.namer.close()
        while True:
            try:
                self.free.get_nowait()
            except queue.Empty:
                return

    def wait(self, *, quiet: bool = False) -> None:
        """Until every batch is written; re-raises the first writer error unless ``quiet``."""
        for future in self.pending:
            if quiet:
                future.exception()
            else:
                future.result()


def extract(stone: StoneFile, path_for: Callable[[int], str | os.PathLike[str]], *,
            options: ExtractOptions | None = None, wanted: Callable[[IndexEntry], bool] | None = None) -> int:
    """Extract every unique file (or those ``wanted`` says) to ``path_for(digest)``. Returns bytes written.

    The digest is verified before a file gets its final name; a mismatch raises StoneError once the writers in
    flight are done, leaving the files verified until then in place and no ``.part`` file behind.
    """
    options = options or ExtractOptions()
    if not stone.index:
        return 0
    entries = stone.content_entries()
    written = 0
    with stone.open_content() as content, \
            ThreadPoolExecutor(max_workers=options.writers, thread_name_prefix="stone-extract") as pool:
        job = _Extraction(stone, content, pool, options, path_for)
        try:
            for entry in entries:
                if wanted is not None and not wanted(entry):
                    continue
                if job.block is None:
                    job.advance()
                while entry.size and entry.start >= job.block.end:
                    job.advance()
                if entry.size <= job.block_size:
                    job.add(entry)
                else:
                    job.stream_large(entry)
                written += entry.size
        except BaseException:
            job.finish(write=False)
            job.wait(quiet=True)
            job.close()
            raise
        job.finish()
        try:
            job.wait()
        finally:
            job.close()
        content.finish()
    return written


def _release(blocks: list[_Block]) -> None:
    for block in blocks:
        block.release()


def _reap(pending: list[Future]) -> list[Future]:
    keep = []
    for future in pending:
        if future.done():
            future.result()  # re-raise a writer's error here
        else:
            keep.append(future)
    return keep


def extract_assets(stone: StoneFile, dest: Path, *, fanout: bool = False,
                   options: ExtractOptions | None = None) -> int:
    """Every unique file to ``dest/<32 hex digest>`` (or below two fan-out levels)."""
    dest.mkdir(parents=True, exist_ok=True)
    return extract(stone, (fanout_path if fanout else flat_path)(dest), options=options)
