"""Read and verify `.stone` v1 files.

`read_stone` parses the archive header and every payload header, verifies the XXH3-64 checksum of every payload
but Content and decodes Meta, Layout, Index and Attributes.  Content stays on disk and is read once, by whoever
needs it: `StoneFile.iter_content`, `verify_content` and `extract` stream it with bounded memory, check each
file's XXH3-128 digest and, at the end, the payload checksum (a package of gigabytes is not read twice, nor at
all by who only wants its metadata).  Anything that does not add up is a `StoneError` naming
the file, the payload and the byte offset — never another exception type.
"""
from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
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

    def content_entries(self) -> list[IndexEntry]:
        """The Index in content-stream order; overlapping records are refused."""
        entries = sorted(self.index, key=lambda e: (e.start, e.end))
        position = 0
        for entry in entries:
            if entry.start < position:
                payload = self.content or "Content"
                raise self.error(f"index records overlap at byte {entry.start} of the content stream", payload,
                                 getattr(payload, "body_offset", None))
            position = entry.end
        return entries

    @contextmanager
    def open_content(self) -> Iterator[ContentStream]:
        payload = self.content
        if payload is None:
            raise self.error("Index present but the file has no Content payload", "Content")
        try:
            handle = open(self.path, "rb", buffering=0)
        except OSError as err:
            raise self.error(err.strerror or str(err), payload) from None
        with handle:
            yield ContentStream(self, payload, handle)

    def check_content_checksum(self) -> None:
        """The Content payload's XXH3-64 alone, without inflating it: for whoever will not read the content but
        must not accept a damaged file (extracting checks it anyway)."""
        if self.content is None:
            return
        with open(self.path, "rb") as handle:
            _verify_stored_checksum(self, handle, self.content)

    def digest_mismatch(self, entry: IndexEntry) -> StoneError:
        payload = self.content or "Content"
        return self.error(
            f"file at [{entry.start}, {entry.end}) of the content stream does not hash to {entry.digest:032x}",
            payload, getattr(payload, "body_offset", None),
        )

    def iter_content(self) -> Iterator[tuple[IndexEntry, Iterator[bytes]]]:
        """Stream every unique file of the Content payload, in stream order.

        Yields ``(entry, chunks)``; the caller may consume ``chunks`` (it is drained otherwise). The file's
        XXH3-128 digest is checked after its last chunk, the payload checksum after the last file.
        """
        return self._files(None)

    def verify_content(self) -> None:
        """Check every file's digest and the Content checksum without keeping any of it."""
        for _entry, chunks in self._files(memoryview(bytearray(CHUNK))):
            for _ in chunks:
                pass

    def _files(self, scratch: memoryview | None) -> Iterator[tuple[IndexEntry, Iterator[bytes]]]:
        """Chunks are fresh bytes, or views of ``scratch`` (reused: only for callers that keep nothing)."""
        if not self.index:
            return
        entries = self.content_entries()
        with self.open_content() as content:
            for entry in entries:
                content.skip_to(entry.start)
                chunks = self._file_chunks(content, entry, scratch)
                yield entry, chunks
                for _ in chunks:  # drain what the caller did not read
                    pass
            content.finish()

    def _file_chunks(self, content: ContentStream, entry: IndexEntry,
                     scratch: memoryview | None) -> Iterator[bytes]:
        hasher = xxhash.xxh3_128()
        remaining = entry.size
        while remaining:
            size = min(remaining, CHUNK)
            chunk = content.read(size) if scratch is None else scratch[: content.readinto(scratch[:size])]
            hasher.update(chunk)
            remaining -= len(chunk)
            yield chunk
        if hasher.intdigest() != entry.digest:
            raise self.digest_mismatch(entry)


class _StoredBody:
    """Reads at most ``limit`` bytes of an unbuffered ``handle`` and hashes them (XXH3-64) on the way through."""

    def __init__(self, handle: BinaryIO, limit: int):
        self._handle = handle
        self._remaining = limit
        self._hasher = xxhash.xxh3_64()

    def read(self, size: int = -1) -> bytes:
        size = self._remaining if size < 0 else min(size, self._remaining)
        data = self._handle.read(size) if size else b""
        self._hasher.update(data)
        self._remaining -= len(data)
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self._remaining]
        count = self._handle.readinto(view) or 0
        self._hasher.update(view[:count])
        self._remaining -= count
        return count

    def drain(self) -> None:
        scratch = bytearray(min(self._remaining, CHUNK))
        while self._remaining and self.readinto(scratch):
            pass

    def digest(self) -> bytes:
        return self._hasher.digest()


class ContentStream:
    """The decompressed Content payload, read front to back.

    Never yields more than ``plain_size`` bytes; `finish` checks that the stream ends exactly there and that the
    stored body hashes to the payload checksum.  Every problem is a StoneError naming the Content payload.
    """

    def __init__(self, stone: StoneFile, payload: PayloadHeader, handle: BinaryIO):
        self.stone = stone
        self.payload = payload
        self.position = 0
        handle.seek(payload.body_offset)
        self._source = _StoredBody(handle, payload.stored_size)
        if payload.compression == Compression.NONE:
            self._stream = self._source
        else:
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
            self._stream = dctx.stream_reader(self._source, read_size=CHUNK)

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` (or as much of it as the stream has left before plain_size); short only at the end."""
        view = memoryview(buffer)[: self.payload.plain_size - self.position]
        filled = 0
        while filled < len(view):
            count = self._guarded(self._stream.readinto, view[filled:])
            if not count:
                raise self.stone.error(
                    f"content inflates to less than its declared plain_size {self.payload.plain_size}",
                    self.payload, self.payload.offset + 8,
                )
            filled += count
        self.position += filled
        return filled

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        del buffer[self.readinto(buffer):]
        return bytes(buffer)

    def skip_to(self, offset: int) -> None:
        if offset > self.payload.plain_size:
            raise self.stone.error(f"index record at byte {offset} lies past the content's plain_size "
                                   f"{self.payload.plain_size}", self.payload, self.payload.offset + 8)
        if offset <= self.position:
            return
        scratch = bytearray(min(offset - self.position, CHUNK))
        while self.position < offset:
            self.readinto(memoryview(scratch)[: offset - self.position])

    def finish(self) -> None:
        self.skip_to(self.payload.plain_size)
        if self._guarded(self._stream.read, 1):
            raise self.stone.error(f"content inflates past its declared plain_size {self.payload.plain_size}",
                                   self.payload, self.payload.offset + 8)
        self._source.drain()
        if self._source.digest() != self.payload.checksum:
            raise self.stone.error("content checksum mismatch (XXH3-64 of the stored body)", self.payload,
                                   self.payload.offset + 16)

    def _guarded(self, call, argument):
        try:
            return call(argument)
        except zstandard.ZstdError as err:
            raise self.stone.error(f"zstd: {err}", self.payload, self.payload.body_offset) from None
        except MemoryError:
            raise self.stone.error("zstd frame needs more memory than is available", self.payload,
                                   self.payload.body_offset) from None


def read_stone(path: str | os.PathLike[str], *, limits: Limits | None = None) -> StoneFile:
    """Parse and verify a `.stone` file (everything but the Content stream, which is verified as it is read)."""
    path = Path(path)
    try:   # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        handle = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    except OSError as err:
        raise StoneError(str(path), err.strerror or str(err)) from None
    with handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StoneError(str(path), "not a regular file (a FIFO, device or directory cannot be a .stone)")
        size = info.st_size
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
        if not known:
            _verify_stored_checksum(stone, handle, header)
        else:  # the Content checksum is checked as the stream goes by (ContentStream.finish): read it once
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
    reader = _StoredBody(handle, header.stored_size)
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
