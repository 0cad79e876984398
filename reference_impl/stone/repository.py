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
