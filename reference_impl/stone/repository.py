"""The repository index `stone.index`: one Meta payload per package, plus its URI, sha256 and size."""
from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path, PurePosixPath

from reference_impl.stone import codec
from reference_impl.stone.model import FileType, PayloadKind
from reference_impl.stone.reader import read_stone
from reference_impl.stone.writer import write_record_file
from stonelab.errors import StonelabError

INDEX_NAME = "stone.index"


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def indexed_path(index: Path, name: str, uri: str | None, sha256: str | None) -> tuple[Path, str]:
    """Where an index entry's package file is (below the index's directory) and its sha256 in lower case.

    Refuses, with one line naming the index and the entry, an entry without PackageURI/PackageHash, a hash that
    is not 64 hex digits, and a URI that is absolute or climbs out of the repository (``..``): a hostile index
    must not make the client read ``/dev/zero`` or a file of someone else's."""
    if not uri or not sha256:
        raise StonelabError(f"{index}: entry {name} has no PackageURI/PackageHash")
    if not _SHA256.fullmatch(sha256):
        raise StonelabError(f"{index}: entry {name}: PackageHash {sha256[:80]!r} is not a sha256 (64 hex digits)")
    parts = PurePosixPath(uri).parts
    if uri.startswith("/") or ".." in parts or "\0" in uri or not parts or parts == (".",):
        raise StonelabError(f"{index}: entry {name}: PackageURI {uri[:200]!r} is not a file inside the "
                            f"repository (absolute, or climbing out with '..')")
    return index.parent / uri, sha256.lower()


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns) of ``path``: equal before and after a use means the same bytes were
    used as were checked (a download resumed or replaced in between changes it).  OSError if it is gone."""
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def check_indexed_file(path: Path, sha256: str, size: int | None) -> tuple[int, int, int, int]:
    """Refuse a repository package file that is not the one ``stone.index`` describes (its PackageHash, the
    sha256 hex digest of the whole file, and PackageSize in bytes): a truncated or resumed download, trailing
    bytes, another build under the indexed name, or no regular file at all (a FIFO or device would never end).
    Raises one-line StonelabError naming the file and both hashes; the file is read once, nothing is written.
    Returns the checked file's ``file_identity``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StonelabError(f"{path}: listed in {INDEX_NAME} but missing from the repository") from None
    except OSError as err:
        raise StonelabError(f"{path}: cannot read: {err.strerror or err}") from None
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StonelabError(f"{path}: listed in {INDEX_NAME} but not a regular file")
        actual_size = info.st_size
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        digest = hashlib.sha256()
        try:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        except OSError as err:
            raise StonelabError(f"{path}: cannot read: {err.strerror or err}") from None
        actual = digest.hexdigest()
    if actual != sha256.lower() or (size is not None and actual_size != size):
        sizes = f"{actual_size} bytes, {INDEX_NAME} says {size}" if size is not None else f"{actual_size} bytes"
        raise StonelabError(f"{path}: does not match {INDEX_NAME}: sha256 {actual}, {INDEX_NAME} says {sha256} "
                            f"({sizes}); refusing it (incomplete download or another build)")
    return identity


def write_repository_index(directory: str | os.PathLike[str]) -> Path:
    """Index every `*.stone` below ``directory`` (URIs relative to it) into ``directory/stone.index``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StonelabError(f"{directory}: not a directory")
    payloads = []
    for path in sorted(directory.rglob("*.stone")):
        stone = read_stone(path)
        if stone.file_type is not FileType.BINARY:
            continue
        meta = stone.meta
        meta.uri = path.relative_to(directory).as_posix()
        meta.hash = sha256_file(path)
        meta.size = path.stat().st_size
        body, count = codec.encode_meta(codec.meta_records(meta))
        payloads.append((PayloadKind.META, body, count))
    return write_record_file(directory / INDEX_NAME, FileType.REPOSITORY, payloads)
