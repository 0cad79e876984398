"""Read and verify `.stone` v1 files.

`read_stone` parses the archive header and every payload header, verifies every payload's XXH3-64 checksum and
decodes Meta, Layout, Index and Attributes.  Content stays on disk: `StoneFile.iter_content` streams it with
bounded memory and checks each file's XXH3-128 digest.  Anything that does not add up is a `StoneError` naming
the file, the payload and the byte offset — never another exception type.
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

from reference_impl.stone import codec
from reference_impl.stone.errors import StoneError
from reference_impl.stone.model import (
    FORMAT_VERSION,
    HEADER_SIZE,
    INTEGRITY,
    MAGIC,
    PAYLOAD_HEADER_SIZE,
    Compression,
    FileType,
    IndexEntry,
    LayoutEntry,
    LayoutType,
    Meta,
    PayloadHeader,
    PayloadKind,
)

ARCHIVE_HEADER = struct.Struct(">4sH21sBI")
PAYLOAD_HEADER = struct.Struct(">QQ8sIHBB")
# upstream's writer uses window log 31; decoders must accept it
MAX_WINDOW = 2**31
CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """How far a payload may inflate before we refuse it (protects against zstd bombs)."""

    max_record_payload: int = 256 * 2**20  # Meta, Layout, Index, Attributes after decompression
    max_content: int = 256 * 2**30  # the Content stream


@dataclass
class StoneFile:
    path: Path
    size: int
    file_type: FileType
    payloads: list[PayloadHeader] = field(default_factory=list)
    metas: list[Meta] = field(default_factory=list)
    layout: list[LayoutEntry] = field(default_factory=list)
    index: list[IndexEntry] = field(default_factory=list)
    attributes: list[tuple[bytes, bytes]] = field(default_factory=list)
    content: PayloadHeader | None = None
    older_writer: bool = False  # layout strings NUL-terminated
    limits: Limits = field(default_factory=Limits)

    @property
    def meta(self) -> Meta:
        return self.metas[0]

    def error(self, problem: str, payload: PayloadHeader | str = "archive", offset: int | None = None) -> StoneError:
        name = payload if isinstance(payload, str) else payload.kind_name
        return StoneError(str(self.path), problem, payload=name, offset=offset)

    def iter_content(self) -> Iterator[tuple[IndexEntry, Iterator[bytes]]]:
        """Stream every unique file of the Content payload, in stream order.

        Yields ``(entry, chunks)``; the caller may consume ``chunks`` (it is drained otherwise). The file's
        XXH3-128 digest is checked after its last chunk, the payload checksum after the last file.
        """
        if not self.index:
            return
        payload = self.content
        if payload is None:
            raise self.error("Index present but the file has no Content payload")
        entries = sorted(self.index, key=lambda e: (e.start, e.end))
        with open(self.path, "rb") as handle:
            handle.seek(payload.body_offset)
            source = _ChecksummedReader(handle, payload.stored_size)
            stream = _open_stream(self, payload, source)
            position = 0
            for entry in entries:
                if entry.start < position:
                    raise self.error(
                        f"index records overlap at byte {entry.start} of the content stream", payload,
                        payload.body_offset,
                    )
                self._skip(stream, entry.start - position, payload)
                chunks = self._file_chunks(stream, entry, payload)
                yield entry, chunks
                for _ in chunks:  # drain what the caller did not read
                    pass
                position = entry.end
            self._skip(stream, payload.plain_size - position, payload)
            if stream.read(1):
                raise self.error(
                    f"content inflates past its declared plain_size {payload.plain_size}", payload, payload.offset + 8
                )
            source.drain()
            if source.digest() != payload.checksum:
                raise self.error("content checksum mismatch (XXH3-64 of the stored body)", payload,
                                 payload.offset + 16)

    def _file_chunks(self, stream: BinaryIO, entry: IndexEntry, payload: PayloadHeader) -> Iterator[bytes]:
        hasher = xxhash.xxh3_128()
        remaining = entry.size
        while remaining:
            chunk = _read(self, stream, min(remaining, CHUNK), payload)
            if not chunk:
                raise self.error(
                    f"content ends {remaining} bytes short of the file at [{entry.start}, {entry.end})", payload,
                    payload.offset,
                )
            hasher.update(chunk)
            remaining -= len(chunk)
            yield chunk
        if hasher.intdigest() != entry.digest:
            raise self.error(
                f"file at [{entry.start}, {entry.end}) of the content stream does not hash to {entry.digest:032x}",
                payload, payload.body_offset,
            )

    def _skip(self, stream: BinaryIO, count: int, payload: PayloadHeader) -> None:
        while count > 0:
            chunk = _read(self, stream, min(count, CHUNK), payload)
            if not chunk:
                raise self.error(
                    f"content inflates to less than its declared plain_size {payload.plain_size}", payload,
                    payload.offset + 8,
                )
            count -= len(chunk)


class _ChecksummedReader(io.RawIOBase):
    """Reads at most ``limit`` bytes of ``handle`` and hashes them (XXH3-64) on the way through."""

    def __init__(self, handle: BinaryIO, limit: int):
        super().__init__()
        self._handle = handle
        self._remaining = limit
        self._hasher = xxhash.xxh3_64()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer)[: self._remaining]
        count = self._handle.readinto(view)
        if count:
            self._hasher.update(view[:count])
            self._remaining -= count
        return count or 0

    def drain(self) -> None:
        while self._remaining and self.read(CHUNK):
            pass

    def digest(self) -> bytes:
        return self._hasher.digest()


def _open_stream(stone: StoneFile, payload: PayloadHeader, source: _ChecksummedReader) -> BinaryIO:
    if payload.compression == Compression.NONE:
        return source  # type: ignore[return-value]
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return dctx.stream_reader(source, read_size=CHUNK)


def _read(stone: StoneFile, stream: BinaryIO, count: int, payload: PayloadHeader) -> bytes:
    try:
        return stream.read(count)
    except zstandard.ZstdError as err:
        raise stone.error(f"zstd: {err}", payload, payload.body_offset) from None
    except MemoryError:
        raise stone.error("zstd frame needs more memory than is available", payload, payload.body_offset) from None


def read_stone(path: str | os.PathLike[str], *, limits: Limits | None = None) -> StoneFile:
    """Parse and verify a `.stone` file (everything but the content stream's per-file digests)."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise StoneError(str(path), err.strerror or str(err)) from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        stone, num_payloads = _read_header(path, handle, size, limits or Limits())
        _read_payloads(stone, handle, num_payloads)
    _check_consistency(stone)
    return stone


def _read_header(path: Path, handle: BinaryIO, size: int, limits: Limits) -> tuple[StoneFile, int]:
    raw = handle.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise StoneError(str(path), f"truncated archive header ({len(raw)} of {HEADER_SIZE} bytes)", payload="header",
                         offset=0)
    magic, num_payloads, integrity, file_type, version = ARCHIVE_HEADER.unpack(raw)
    if magic != MAGIC:
        raise StoneError(str(path), f"not a .stone file (magic {magic.hex()})", payload="header", offset=0)
    if integrity != INTEGRITY:
        raise StoneError(str(path), "corrupt archive header (integrity pattern)", payload="header", offset=6)
    if version != FORMAT_VERSION:
        raise StoneError(str(path), f"unsupported format version {version}", payload="header", offset=28)
    try:
        ftype = FileType(file_type)
    except ValueError:
        raise StoneError(str(path), f"unknown file type {file_type}", payload="header", offset=27) from None
    if ftype is FileType.DELTA:
        # Never produced nor installed upstream; accepting it would let a flipped type byte pass unnoticed.
        raise StoneError(str(path), "delta packages are not supported", payload="header", offset=27)
    return StoneFile(path=path, size=size, file_type=ftype, limits=limits), num_payloads


def _read_payloads(stone: StoneFile, handle: BinaryIO, num_payloads: int) -> None:
    offset = HEADER_SIZE
    for number in range(num_payloads):
        handle.seek(offset)
        raw = handle.read(PAYLOAD_HEADER_SIZE)
        if len(raw) < PAYLOAD_HEADER_SIZE:
            raise stone.error(
                f"truncated: payload {number + 1} of {num_payloads} header missing ({len(raw)} bytes)", "header",
                offset
            )
        header = PayloadHeader(*PAYLOAD_HEADER.unpack(raw), offset=offset)
        if header.body_offset + header.stored_size > stone.size:
            raise stone.error(
                f"stored_size {header.stored_size} runs {header.body_offset + header.stored_size - stone.size} "
                "bytes past the end of the file", header, offset,
            )
        if header.version != 1:
            raise stone.error(f"unsupported payload version {header.version}", header, offset + 28)
        stone.payloads.append(header)
        _read_payload(stone, handle, header)
        offset = header.body_offset + header.stored_size
    if offset != stone.size:
        raise stone.error(f"{stone.size - offset} bytes of trailing data after the last payload", "archive", offset)


def _read_payload(stone: StoneFile, handle: BinaryIO, header: PayloadHeader) -> None:
    known = header.kind in PayloadKind._value2member_map_ and header.compression in Compression._value2member_map_
    if not known or header.kind == PayloadKind.CONTENT:
        _verify_stored_checksum(stone, handle, header)
        if header.kind == PayloadKind.CONTENT and known:
            if stone.content is not None:
                raise stone.error("more than one Content payload", header, header.offset)
            if header.plain_size > stone.limits.max_content:
                raise stone.error(
                    f"plain_size {header.plain_size} exceeds the limit of {stone.limits.max_content} bytes",
                    header, header.offset + 8,
                )
            stone.content = header
        return  # unknown kinds and compressions are skipped (forward compatibility)
    body = _record_body(stone, handle, header)
    try:
        if header.kind == PayloadKind.META:
            stone.metas.append(codec.decode_meta(body, header.num_records))
        elif header.kind == PayloadKind.LAYOUT:
            if stone.layout:
                raise stone.error("more than one Layout payload", header, header.offset)
            stone.layout, stone.older_writer = codec.decode_layout(body, header.num_records)
        elif header.kind == PayloadKind.INDEX:
            if stone.index:
                raise stone.error("more than one Index payload", header, header.offset)
            stone.index = codec.decode_index(body, header.num_records)
        elif header.kind == PayloadKind.ATTRIBUTES:
            stone.attributes.extend(codec.decode_attributes(body, header.num_records))
    except codec.RecordError as err:
        raise stone.error(f"{err.problem} (at byte {err.offset} of the decoded payload)", header,
                          header.body_offset) from None


def _verify_stored_checksum(stone: StoneFile, handle: BinaryIO, header: PayloadHeader) -> None:
    handle.seek(header.body_offset)
    reader = _ChecksummedReader(handle, header.stored_size)
    reader.drain()
    if reader.digest() != header.checksum:
        raise stone.error("checksum mismatch (XXH3-64 of the stored body)", header, header.offset + 16)


def _record_body(stone: StoneFile, handle: BinaryIO, header: PayloadHeader) -> bytes:
    limit = stone.limits.max_record_payload
    if header.plain_size > limit:
        raise stone.error(f"plain_size {header.plain_size} exceeds the limit of {limit} bytes", header,
                          header.offset + 8)
    if header.stored_size > max(limit, 1 << 20):
        raise stone.error(f"stored_size {header.stored_size} exceeds the limit of {limit} bytes", header,
                          header.offset)
    handle.seek(header.body_offset)
    stored = handle.read(header.stored_size)
    if xxhash.xxh3_64_digest(stored) != header.checksum:
        raise stone.error("checksum mismatch (XXH3-64 of the stored body)", header, header.offset + 16)
    if header.compression == Compression.NONE:
        plain = stored
    else:
        try:
            reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(io.BytesIO(stored))
            plain = reader.read(header.plain_size + 1)
        except zstandard.ZstdError as err:
            raise stone.error(f"zstd: {err}", header, header.body_offset) from None
    if len(plain) != header.plain_size:
        relation = "past" if len(plain) > header.plain_size else f"to {len(plain)} bytes, short of"
        raise stone.error(f"body inflates {relation} its declared plain_size {header.plain_size}", header,
                          header.offset + 8)
    return plain


def read_payload_body(stone: StoneFile, header: PayloadHeader) -> bytes:
    """The decompressed body of a record payload (Meta, Layout, Index, Attributes), checksum verified."""
    with open(stone.path, "rb") as handle:
        return _record_body(stone, handle, header)


def _check_consistency(stone: StoneFile) -> None:
    if not stone.metas:
        raise stone.error("no Meta payload", "Meta")
    if stone.file_type is FileType.BINARY and len(stone.metas) != 1:
        raise stone.error(f"a binary package carries {len(stone.metas)} Meta payloads", "Meta")
    content = stone.content
    if stone.file_type is not FileType.BINARY:
        if stone.layout or stone.index or content is not None:
            raise stone.error(f"a {stone.file_type.label} file carries Layout, Index or Content payloads")
        return
    if stone.index:
        if content is None:
            raise stone.error("Index present but the file has no Content payload", "Content")
        for entry in stone.index:
            if entry.end > content.plain_size:
                raise stone.error(
                    f"index record [{entry.start}, {entry.end}) lies past the content's plain_size "
                    f"{content.plain_size}", content, content.offset + 8,
                )
    if content is not None and stone.layout:
        expected = len(stone.index) if stone.older_writer else 0
        if content.num_records != expected:
            raise stone.error(f"content num_records {content.num_records}, expected {expected}", content,
                              content.offset + 24)
    indexed = {e.digest for e in stone.index}
    used = set()
    for entry in stone.layout:
        if entry.file_type is LayoutType.REGULAR:
            if entry.digest not in indexed:
                raise stone.error(
                    f"layout file /usr/{entry.target} has no content in the Index ({entry.digest:032x})", "Layout")
            used.add(entry.digest)
    unused = indexed - used
    if unused:
        raise stone.error(f"{len(unused)} Index record(s) no layout file uses (e.g. {min(unused):032x})", "Index")
