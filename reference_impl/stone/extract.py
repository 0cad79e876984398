"""Write a package's unique files out of the Content stream, verified, with bounded memory.

Decompression and hashing are sequential (one zstd frame); creating files is what costs on a real filesystem
(~0.25 ms per create on this lab's ext4), so small files are handed to a few writer threads that create and
write them while the stream goes on.  Files above ``inline_limit`` are streamed by the calling thread.  At most
``max_in_flight`` bytes wait for a writer.  Every file is written as ``<name>.part`` and renamed into place only
after its digest checked out, so a crash or a corrupt package never leaves a wrong file under a final name.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from reference_impl.stone.model import IndexEntry
from reference_impl.stone.reader import StoneFile


@dataclass(frozen=True)
class ExtractOptions:
    writers: int = 2
    inline_limit: int = 16 * 2**20
    batch_bytes: int = 2 * 2**20
    batch_files: int = 64
    max_in_flight: int = 64 * 2**20
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


def _write_file(final: str, chunks: Iterable[bytes], options: ExtractOptions) -> None:
    part = final + ".part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(part, flags, options.mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(part), exist_ok=True)
        fd = os.open(part, flags, options.mode)
    try:
        for chunk in chunks:
            os.write(fd, chunk)
        if options.fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(part, final)


class _Budget:
    """Bytes handed to writer threads and not yet written."""

    def __init__(self, limit: int):
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def take(self, amount: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._used == 0 or self._used + amount <= self._limit)
            self._used += amount

    def give(self, amount: int) -> None:
        with self._cond:
            self._used -= amount
            self._cond.notify_all()


def extract(stone: StoneFile, path_for: Callable[[int], str | os.PathLike[str]], *, options: ExtractOptions | None = None,
            wanted: Callable[[IndexEntry], bool] | None = None) -> int:
    """Extract every unique file (or those ``wanted`` says) to ``path_for(digest)``. Returns bytes written.

    The digest is verified before a file gets its final name; a mismatch raises StoneError and leaves only
    ``.part`` files behind (the caller's directory, the caller's cleanup).
    """
    options = options or ExtractOptions()
    budget = _Budget(options.max_in_flight)
    written = 0
    pending: list[Future] = []
    batch: list[tuple[str, list[bytes]]] = []
    batch_bytes = 0

    def submit() -> None:
        nonlocal batch, batch_bytes
        budget.take(batch_bytes)
        future = pool.submit(_write_batch, batch, options)
        future.add_done_callback(lambda _f, size=batch_bytes: budget.give(size))
        pending.append(future)
        batch, batch_bytes = [], 0

    with ThreadPoolExecutor(max_workers=options.writers, thread_name_prefix="stone-extract") as pool:
        try:
            for entry, chunks in stone.iter_content():
                if wanted is not None and not wanted(entry):
                    continue
                final = os.fspath(path_for(entry.digest))
                if entry.size > options.inline_limit:
                    _write_file(final, chunks, options)
                else:
                    batch.append((final, list(chunks)))  # digest verified once the generator is exhausted
                    batch_bytes += entry.size
                    if batch_bytes >= options.batch_bytes or len(batch) >= options.batch_files:
                        submit()
                written += entry.size
                if len(pending) > 64:
                    pending = _reap(pending)
            if batch:
                submit()
        finally:
            for future in pending:
                future.result()
    return written


def _write_batch(batch: list[tuple[str, list[bytes]]], options: ExtractOptions) -> None:
    for final, chunks in batch:
        _write_file(final, chunks, options)


def _reap(pending: list[Future]) -> list[Future]:
    keep = []
    for future in pending:
        if future.done():
            future.result()  # re-raise a writer's OSError here
        else:
            keep.append(future)
    return keep



def extract_assets(stone: StoneFile, dest: Path, *, fanout: bool = False,
                   options: ExtractOptions | None = None) -> int:
    """Every unique file to ``dest/<32 hex digest>`` (or below two fan-out levels)."""
    dest.mkdir(parents=True, exist_ok=True)
    return extract(stone, (fanout_path if fanout else flat_path)(dest), options=options)
