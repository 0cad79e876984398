"""The repository index `stone.index`: one Meta payload per package, plus its URI, sha256 and size."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from reference_impl.stone import codec
from reference_impl.stone.model import FileType, PayloadKind
from reference_impl.stone.reader import read_stone
from reference_impl.stone.writer import write_record_file
from stonelab.errors import StonelabError

INDEX_NAME = "stone.index"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_indexed_file(path: Path, sha256: str, size: int | None) -> None:
    """Refuse a repository package file that is not the one ``stone.index`` describes (its PackageHash, the
    sha256 hex digest of the whole file, and PackageSize in bytes): a truncated or resumed download, trailing
    bytes, another build under the indexed name.  Raises one-line StonelabError naming the file and both
    hashes; the file is read once, nothing is written."""
    try:
        actual_size = path.stat().st_size
        actual = sha256_file(path)
    except FileNotFoundError:
        raise StonelabError(f"{path}: listed in {INDEX_NAME} but missing from the repository") from None
    except OSError as err:
        raise StonelabError(f"{path}: cannot read: {err.strerror or err}") from None
    if actual != sha256.lower() or (size is not None and actual_size != size):
        sizes = f"{actual_size} bytes, {INDEX_NAME} says {size}" if size is not None else f"{actual_size} bytes"
        raise StonelabError(f"{path}: does not match {INDEX_NAME}: sha256 {actual}, {INDEX_NAME} says {sha256} "
                            f"({sizes}); refusing it (incomplete download or another build)")


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
