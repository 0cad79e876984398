"""The content-addressed store: ``.moss/assets/v2/aa/bb/cc/<hex>``, one file per unique content.

Assets are extracted by `stone.extract`: verified against their XXH3-128 digest, written as an unnamed O_TMPFILE
inode (or ``<hex>.part`` where the filesystem has none) and only then given their name, so a final name never
holds wrong or partial content.  Canonical assets are mode 0444; the blit keeps
mode/owner variants ``<hex>.<mode>.<uid>.<gid>`` next to them (see blit.py).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from reference_impl import mutants
from reference_impl.stone import StoneFile
from reference_impl.stone.extract import ExtractOptions, extract

ASSET_MODE = 0o444
_CHUNK = 1 << 20


def asset_name(digest: int) -> str:
    return format(digest, "x")


def asset_path(store: Path, digest: int) -> Path:
    """moss's fan-out: three levels of two hex digits, unless the name is shorter than 10 characters."""
    h = asset_name(digest)
    if len(h) < 10:
        return store / h
    return store / h[0:2] / h[2:4] / h[4:6] / h


@dataclass(frozen=True)
class AssetProblem:
    digest: int
    path: Path
    problem: str


class Store:
    def __init__(self, path: Path, *, fsync: bool = True):
        self.path = path
        self.fsync = fsync

    def asset(self, digest: int) -> Path:
        return asset_path(self.path, digest)

    def has(self, digest: int) -> bool:
        return self.asset(digest).is_file()

    def add(self, stone: StoneFile) -> int:
        """Extract the package's content that the store lacks. Returns the bytes written."""
        self.path.mkdir(parents=True, exist_ok=True)
        wanted = {e.digest for e in stone.index if not self.has(e.digest)}
        if not wanted:
            return 0
        options = ExtractOptions(fsync=self.fsync, mode=ASSET_MODE)
        return extract(stone, lambda digest: os.fspath(self.asset(digest)), options=options,
                       wanted=lambda e: e.digest in wanted)

    def iter_files(self) -> Iterator[Path]:
        """Every file in the store: canonical assets, variants, and ``.part`` leftovers."""
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                yield Path(dirpath, name)

    def verify(self, digests: Iterable[int]) -> list[AssetProblem]:
        problems = []
        for digest in sorted(set(digests)):
            path = self.asset(digest)
            actual = hash_file(path)
            if actual is None:
                problems.append(AssetProblem(digest, path, "missing"))
            elif actual != digest and not mutants.active("skip-asset-hash-check"):
                problems.append(AssetProblem(digest, path, f"content hashes to {actual:032x}"))
            for variant in path.parent.glob(path.name + ".*"):
                if variant.name.endswith(".part"):
                    continue
                actual = hash_file(variant)
                if actual != digest:
                    problems.append(AssetProblem(digest, variant, f"variant content hashes to {actual or 0:032x}"))
        return problems

    def remove_unreferenced(self, referenced: set[int]) -> int:
        """Delete assets (and their variants, and stale .part files) no layout refers to. Returns the count."""
        removed = 0
        for path in list(self.iter_files()):
            base = path.name.split(".", 1)[0]
            try:
                digest = int(base, 16)
            except ValueError:
                continue
            if digest not in referenced or path.name.endswith(".part"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def hash_file(path: Path) -> int | None:
    """XXH3-128 of a file's content, or None when it does not exist."""
    hasher = xxhash.xxh3_128()
    try:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
    except (FileNotFoundError, IsADirectoryError):
        return None
    return hasher.intdigest()
