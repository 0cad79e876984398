"""Write `.stone` v1 files: packages built from a directory tree, and the low-level payload writer."""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

from reference_impl.stone import codec
from reference_impl.stone.model import (
    FORMAT_VERSION,
    INTEGRITY,
    MAGIC,
    Compression,
    Dependency,
    FileType,
    IndexEntry,
    LayoutEntry,
    LayoutType,
    Meta,
    PayloadKind,
)
from reference_impl.stone.reader import ARCHIVE_HEADER, PAYLOAD_HEADER
from stonelab.errors import StonelabError
from stonelab.yamlfile import read_yaml

CHUNK = 1 << 20
DEFAULT_LEVEL = 18  # upstream's level


@dataclass
class PackageSpec:
    """What a package says about itself; the tree says what it contains."""

    name: str
    version: str
    release: int = 1
    build_release: int = 1
    architecture: str = "x86_64"
    summary: str = ""
    description: str = ""
    homepage: str = ""
    source_id: str = ""
    license: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    # per-path overrides, paths relative to /usr
    owners: dict[str, tuple[int, int]] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)

    def to_meta(self) -> Meta:
        return Meta(
            name=self.name,
            version=str(self.version),
            release=int(self.release),
            build_release=int(self.build_release),
            architecture=self.architecture,
            summary=self.summary or self.name,
            description=self.description or self.summary or self.name,
            homepage=self.homepage,
            source_id=self.source_id or self.name,
            licenses=list(self.license),
            depends=[Dependency.parse(d) for d in self.depends],
            provides=[Dependency.parse(p) for p in self.provides],
            conflicts=[Dependency.parse(c) for c in self.conflicts],
        )


SPEC_FIELDS = {"name", "version", "release", "build_release", "architecture", "summary", "description",
               "homepage", "source_id", "license", "depends", "provides", "conflicts", "owners", "modes"}


def load_spec(path: str | os.PathLike[str]) -> PackageSpec:
    """Read a package metadata file (YAML). Errors name the file and the problem."""
    path = Path(path)
    data = read_yaml(path, kind="not valid YAML")
    if not isinstance(data, dict):
        raise StonelabError(f"{path}: expected a mapping of package fields")
    unknown = set(data) - SPEC_FIELDS
    if unknown:
        raise StonelabError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    for required in ("name", "version"):
        if not data.get(required):
            raise StonelabError(f"{path}: missing required field '{required}'")
    if isinstance(data.get("license"), str):
        data["license"] = [data["license"]]
    try:
        spec = PackageSpec(**data)
        spec.owners = {k: (int(v[0]), int(v[1])) for k, v in (spec.owners or {}).items()}
        spec.modes = {k: int(v, 8) if isinstance(v, str) else int(v) for k, v in (spec.modes or {}).items()}
        spec.to_meta()
    except (TypeError, ValueError, IndexError) as err:
        raise StonelabError(f"{path}: {err}") from None
    return spec


# --- low-level writing ------------------------------------------------------------------------------------

class _HashingWriter:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.hasher = xxhash.xxh3_64()
        self.count = 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.count += len(data)
        return self.out.write(data)


def _record_payload(kind: PayloadKind, body: bytes, num_records: int, level: int) -> bytes:
    stored = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    header = PAYLOAD_HEADER.pack(len(stored), len(body), xxhash.xxh3_64_digest(stored), num_records, 1, kind,
                                 Compression.ZSTD)
    return header + stored


def write_archive_header(out: BinaryIO, file_type: FileType, num_payloads: int) -> None:
    out.write(ARCHIVE_HEADER.pack(MAGIC, num_payloads, INTEGRITY, file_type, FORMAT_VERSION))


def write_record_file(out_path: Path, file_type: FileType, payloads: list[tuple[PayloadKind, bytes, int]],
                      *, level: int = DEFAULT_LEVEL) -> Path:
    """Write a file made only of record payloads (index, manifest)."""
    tmp = out_path.with_name(out_path.name + ".part")
    with open(tmp, "wb") as out:
        write_archive_header(out, file_type, len(payloads))
        for kind, body, count in payloads:
            out.write(_record_payload(kind, body, count, level))
    tmp.rename(out_path)
    return out_path


# --- packages from a tree ---------------------------------------------------------------------------------

@dataclass
class _TreeScan:
    layout: list[LayoutEntry]
    files: dict[int, tuple[int, Path]]  # digest -> (size, first path with that content)


def _hash_file(path: Path) -> tuple[int, int]:
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.intdigest(), size


DEFAULT_DIRECTORY_MODE = 0o755


def _records_directory(entry: LayoutEntry, empty: bool) -> bool:
    """Upstream's builder records only empty directories; the reference records too every directory whose mode
    or owner is not the default (0755, root:root), which the blit would otherwise create as 0755 root:root
    (a 1777 tmp directory, a 0750 directory of a service user...)."""
    return empty or stat.S_IMODE(entry.mode) != DEFAULT_DIRECTORY_MODE or (entry.uid, entry.gid) != (0, 0)


def scan_tree(tree: Path, spec: PackageSpec) -> _TreeScan:
    """Walk the /usr tree in a stable order: regular files, symlinks, and the directories that are empty or whose
    mode (from the tree, or ``spec.modes``) or owner (``spec.owners``) is not 0755 root:root."""
    if not tree.is_dir():
        raise StonelabError(f"{tree}: not a directory")
    layout: list[LayoutEntry] = []
    files: dict[int, tuple[int, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        rel_dir = base.relative_to(tree).as_posix()
        names = sorted(filenames + [d for d in dirnames if (base / d).is_symlink()])
        if rel_dir != ".":
            entry = _entry(spec, rel_dir, os.lstat(base), LayoutType.DIRECTORY)
            if _records_directory(entry, not filenames and not dirnames):
                layout.append(entry)
        for name in names:
            full = base / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                layout.append(_entry(spec, rel, st, LayoutType.SYMLINK, source=os.readlink(full)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = _hash_file(full)
                files.setdefault(digest, (size, full))
                layout.append(_entry(spec, rel, st, LayoutType.REGULAR, digest=digest))
            else:
                raise StonelabError(f"{full}: unsupported file type (only files, symlinks and directories)")
    for entry in layout:
        codec.check_layout_path(entry.target, entry.file_type, 0)
    return _TreeScan(layout, files)


def _entry(spec: PackageSpec, rel: str, st: os.stat_result, ftype: LayoutType, *, digest: int | None = None,
           source: str | None = None) -> LayoutEntry:
    uid, gid = spec.owners.get(rel, (0, 0))
    mode = st.st_mode
    if rel in spec.modes:
        mode = stat.S_IFMT(st.st_mode) | spec.modes[rel]
    return LayoutEntry(uid, gid, mode, 0, ftype, rel, digest, source)


def build_package(tree: str | os.PathLike[str], spec: PackageSpec, out: str | os.PathLike[str], *,
                  level: int = DEFAULT_LEVEL) -> Path:
    """Build a binary package: Meta, Layout, Index, Content (largest files first, de-duplicated)."""
    tree, out = Path(tree), Path(out)
    scan = scan_tree(tree, spec)
    order = sorted(scan.files.items(), key=lambda item: (-item[1][0], item[0]))
    index: list[IndexEntry] = []
    position = 0
    for digest, (size, _path) in order:
        index.append(IndexEntry(position, position + size, digest))
        position += size
    meta_body, meta_count = codec.encode_meta(codec.meta_records(spec.to_meta()))
    layout_body, layout_count = codec.encode_layout(scan.layout)
    index_body, index_count = codec.encode_index(index)
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "w+b") as handle:
            write_archive_header(handle, FileType.BINARY, 4)
            handle.write(_record_payload(PayloadKind.META, meta_body, meta_count, level))
            handle.write(_record_payload(PayloadKind.LAYOUT, layout_body, layout_count, level))
            handle.write(_record_payload(PayloadKind.INDEX, index_body, index_count, level))
            _write_content(handle, order, position, level)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_content(handle: BinaryIO, order: Iterable[tuple[int, tuple[int, Path]]], plain_size: int,
                   level: int) -> None:
    header_at = handle.tell()
    handle.write(b"\0" * PAYLOAD_HEADER.size)
    sink = _HashingWriter(handle)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    with compressor.stream_writer(sink, size=plain_size, closefd=False) as writer:
        for digest, (size, path) in order:
            hasher = xxhash.xxh3_128()
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    writer.write(chunk)
            if hasher.intdigest() != digest:
                raise StonelabError(f"{path}: changed while the package was being built")
    end = handle.tell()
    handle.seek(header_at)
    handle.write(PAYLOAD_HEADER.pack(sink.count, plain_size, sink.hasher.digest(), 0, 1, PayloadKind.CONTENT,
                                     Compression.ZSTD))
    handle.seek(end)



def build_package_from_files(files: Mapping[str, str | bytes], spec: PackageSpec, out: str | os.PathLike[str], *,
                             symlinks: Mapping[str, str] | None = None, level: int = DEFAULT_LEVEL) -> Path:
    """A package from in-memory content (paths relative to /usr). Files are 0644 and directories 0755 unless
    ``spec.modes`` says otherwise, whatever the umask; the tree is built beside ``out`` and removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tree-", dir=out.parent) as tmp:
        tree = Path(tmp)
        for rel, content in files.items():
            path = tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            os.chmod(path, 0o644)
        for rel, dest in (symlinks or {}).items():
            path = tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(dest, path)
        for directory in (p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink()):
            os.chmod(directory, DEFAULT_DIRECTORY_MODE)
        return build_package(tree, spec, out, level=level)
