"""Encode and decode the record payloads (Meta, Layout, Index, Attributes) — plain bytes, no compression.

Decoders raise ``RecordError`` with the offset inside the decompressed payload; the reader adds file and payload.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

from reference_impl.stone.model import (
    INTEGER_FORMATS,
    Dependency,
    DependencyKind,
    IndexEntry,
    LayoutEntry,
    LayoutType,
    Meta,
    MetaRecord,
    MetaTag,
    Primitive,
)

META_HEADER = struct.Struct(">IHBB")
LAYOUT_HEADER = struct.Struct(">IIIIHHB11x")
INDEX_RECORD = struct.Struct(">QQ16s")
ATTRIBUTE_HEADER = struct.Struct(">QQ")

STRING_TAGS = {
    MetaTag.NAME: "name",
    MetaTag.ARCHITECTURE: "architecture",
    MetaTag.VERSION: "version",
    MetaTag.SUMMARY: "summary",
    MetaTag.DESCRIPTION: "description",
    MetaTag.HOMEPAGE: "homepage",
    MetaTag.SOURCE_ID: "source_id",
    MetaTag.PACKAGE_URI: "uri",
    MetaTag.PACKAGE_HASH: "hash",
    MetaTag.SOURCE_URI: "source_uri",
    MetaTag.SOURCE_PATH: "source_path",
    MetaTag.SOURCE_REF: "source_ref",
}
INTEGER_TAGS = {
    MetaTag.RELEASE: "release",
    MetaTag.BUILD_RELEASE: "build_release",
    MetaTag.PACKAGE_SIZE: "size",
}
LIST_TAGS = {
    MetaTag.DEPENDS: "depends",
    MetaTag.PROVIDES: "provides",
    MetaTag.CONFLICTS: "conflicts",
    MetaTag.BUILD_DEPENDS: "build_depends",
    MetaTag.LICENSE: "licenses",
}
REQUIRED_TAGS = (
    MetaTag.NAME, MetaTag.VERSION, MetaTag.RELEASE, MetaTag.BUILD_RELEASE, MetaTag.ARCHITECTURE,
    MetaTag.SUMMARY, MetaTag.DESCRIPTION, MetaTag.SOURCE_ID, MetaTag.HOMEPAGE,
)


class RecordError(ValueError):
    def __init__(self, problem: str, offset: int):
        super().__init__(problem)
        self.problem = problem
        self.offset = offset


def _text(raw: bytes, offset: int, what: str) -> str:
    raw = raw.rstrip(b"\0")
    if b"\0" in raw:
        raise RecordError(f"{what} contains a NUL byte", offset)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError(f"{what} is not valid UTF-8", offset) from None


# --- Meta -------------------------------------------------------------------------------------------------

def decode_meta(data: bytes, num_records: int) -> Meta:
    meta = Meta()
    pos = 0
    seen: set[int] = set()
    for _ in range(num_records):
        if pos + META_HEADER.size > len(data):
            raise RecordError("meta record header overruns the payload", pos)
        length, tag, kind, _pad = META_HEADER.unpack_from(data, pos)
        value_at = pos + META_HEADER.size
        if value_at + length > len(data):
            raise RecordError(f"meta record of {length} bytes overruns the payload", pos)
        raw = data[value_at:value_at + length]
        try:
            primitive = Primitive(kind)
        except ValueError:
            raise RecordError(f"unknown meta primitive kind {kind}", pos) from None
        value = _decode_primitive(primitive, raw, pos)
        try:
            tag_value: MetaTag | int = MetaTag(tag)
        except ValueError:
            tag_value = tag  # unknown tag: kept raw, ignored
        meta.records.append(MetaRecord(tag_value, primitive, value))
        _apply(meta, tag_value, primitive, value, pos)
        seen.add(tag)
        pos = value_at + length
    if pos != len(data):
        raise RecordError(f"{len(data) - pos} bytes after the last meta record", pos)
    missing = [t.name.lower() for t in REQUIRED_TAGS if t not in seen]
    if missing:
        raise RecordError("meta lacks required fields: " + ", ".join(missing), len(data))
    return meta


def _decode_primitive(primitive: Primitive, raw: bytes, offset: int) -> object:
    if primitive in INTEGER_FORMATS:
        fmt = INTEGER_FORMATS[primitive]
        if len(raw) != struct.calcsize(fmt):
            raise RecordError(f"{primitive.name.lower()} value of {len(raw)} bytes", offset)
        return struct.unpack(fmt, raw)[0]
    if primitive is Primitive.STRING:
        return _text(raw, offset, "meta string")
    # Dependency / Provider: one kind byte + NUL-terminated UTF-8
    if len(raw) < 2:
        raise RecordError("dependency record too short", offset)
    try:
        dep_kind = DependencyKind(raw[0])
    except ValueError:
        raise RecordError(f"unknown dependency kind {raw[0]}", offset) from None
    return Dependency(dep_kind, _text(raw[1:], offset, "dependency name"))


def _apply(meta: Meta, tag: MetaTag | int, primitive: Primitive, value: object, offset: int) -> None:
    if not isinstance(tag, MetaTag):
        return
    if tag in STRING_TAGS:
        if not isinstance(value, str):
            raise RecordError(f"meta {tag.name.lower()} is not a string", offset)
        setattr(meta, STRING_TAGS[tag], value)
    elif tag in INTEGER_TAGS:
        if not isinstance(value, int):
            raise RecordError(f"meta {tag.name.lower()} is not an integer", offset)
        setattr(meta, INTEGER_TAGS[tag], value)
    elif tag is MetaTag.LICENSE:
        if not isinstance(value, str):
            raise RecordError("meta license is not a string", offset)
        meta.licenses.append(value)
    elif tag in LIST_TAGS:
        if not isinstance(value, Dependency):
            raise RecordError(f"meta {tag.name.lower()} is not a dependency", offset)
        getattr(meta, LIST_TAGS[tag]).append(value)


def _encode_record(tag: int, primitive: Primitive, value: object) -> bytes:
    if primitive in INTEGER_FORMATS:
        raw = struct.pack(INTEGER_FORMATS[primitive], value)
    elif primitive is Primitive.STRING:
        raw = str(value).encode() + b"\0"
    else:
        dep = value if isinstance(value, Dependency) else Dependency.parse(str(value))
        raw = bytes([dep.kind]) + dep.name.encode() + b"\0"
    return META_HEADER.pack(len(raw), tag, primitive, 0) + raw


def meta_records(meta: Meta) -> list[MetaRecord]:
    """The records upstream's writer emits for a package, in its order."""
    records: list[MetaRecord] = []

    def string(tag: MetaTag, value: str | None) -> None:
        if value is not None:
            records.append(MetaRecord(tag, Primitive.STRING, value))

    string(MetaTag.NAME, meta.name)
    string(MetaTag.VERSION, meta.version)
    records.append(MetaRecord(MetaTag.RELEASE, Primitive.UINT64, meta.release))
    records.append(MetaRecord(MetaTag.BUILD_RELEASE, Primitive.UINT64, meta.build_release))
    string(MetaTag.ARCHITECTURE, meta.architecture)
    string(MetaTag.SUMMARY, meta.summary)
    string(MetaTag.DESCRIPTION, meta.description)
    string(MetaTag.SOURCE_ID, meta.source_id)
    string(MetaTag.HOMEPAGE, meta.homepage)
    for lic in meta.licenses:
        records.append(MetaRecord(MetaTag.LICENSE, Primitive.STRING, lic))
    for dep in meta.depends:
        records.append(MetaRecord(MetaTag.DEPENDS, Primitive.DEPENDENCY, dep))
    for prov in meta.provides:
        if prov.kind is not DependencyKind.NAME:  # upstream does not write name() providers
            records.append(MetaRecord(MetaTag.PROVIDES, Primitive.PROVIDER, prov))
    for conflict in meta.conflicts:
        records.append(MetaRecord(MetaTag.CONFLICTS, Primitive.PROVIDER, conflict))
    string(MetaTag.PACKAGE_URI, meta.uri)
    string(MetaTag.PACKAGE_HASH, meta.hash)
    if meta.size is not None:
        records.append(MetaRecord(MetaTag.PACKAGE_SIZE, Primitive.UINT64, meta.size))
    for dep in meta.build_depends:
        records.append(MetaRecord(MetaTag.BUILD_DEPENDS, Primitive.DEPENDENCY, dep))
    string(MetaTag.SOURCE_URI, meta.source_uri)
    string(MetaTag.SOURCE_PATH, meta.source_path)
    string(MetaTag.SOURCE_REF, meta.source_ref)
    return records


def encode_meta(records: Iterable[MetaRecord]) -> tuple[bytes, int]:
    """Encode records; returns (bytes, number of records)."""
    parts = [_encode_record(int(r.tag), r.primitive, r.value) for r in records]
    return b"".join(parts), len(parts)


# --- Layout -----------------------------------------------------------------------------------------------

def decode_layout(data: bytes, num_records: int) -> tuple[list[LayoutEntry], bool]:
    """Decode layout records. Returns the entries and whether the writer NUL-terminated strings (older writer)."""
    entries: list[LayoutEntry] = []
    nul_terminated = False
    pos = 0
    for _ in range(num_records):
        if pos + LAYOUT_HEADER.size > len(data):
            raise RecordError("layout record header overruns the payload", pos)
        uid, gid, mode, tag, source_len, target_len, ftype = LAYOUT_HEADER.unpack_from(data, pos)
        body = pos + LAYOUT_HEADER.size
        if body + source_len + target_len > len(data):
            raise RecordError("layout record overruns the payload", pos)
        source = data[body:body + source_len]
        target_raw = data[body + source_len:body + source_len + target_len]
        try:
            file_type = LayoutType(ftype)
        except ValueError:
            raise RecordError(f"unknown layout file type {ftype}", pos) from None
        if target_raw.endswith(b"\0"):
            nul_terminated = True
        target = _text(target_raw, pos, "layout path")
        check_layout_path(target, file_type, pos)
        digest = None
        link = None
        if file_type is LayoutType.REGULAR:
            if len(source) != 16:
                raise RecordError(f"regular file record with a {len(source)}-byte digest", pos)
            digest = int.from_bytes(source, "big")
        elif file_type is LayoutType.SYMLINK:
            link = _text(source, pos, "symlink destination")
            if not link:
                raise RecordError(f"symlink /usr/{target} has an empty destination", pos)
        elif source_len:
            raise RecordError(f"{file_type.label} record carries a source", pos)
        entries.append(LayoutEntry(uid, gid, mode, tag, file_type, target, digest, link))
        pos = body + source_len + target_len
    if pos != len(data):
        raise RecordError(f"{len(data) - pos} bytes after the last layout record", pos)
    check_layout_tree(entries)
    return entries, nul_terminated


def check_layout_path(target: str, file_type: LayoutType, offset: int) -> None:
    """A layout path must stay inside /usr: relative, no '..', no NUL, no empty or '.' components."""
    if target.startswith("/"):
        raise RecordError(f"layout path {target!r} is absolute", offset)
    if not target:
        if file_type is LayoutType.DIRECTORY:
            return  # /usr itself
        raise RecordError("layout path is empty", offset)
    parts = target.split("/")
    if ".." in parts:
        raise RecordError(f"layout path {target!r} escapes /usr", offset)
    if any(p in ("", ".") for p in parts):
        raise RecordError(f"layout path {target!r} is not normalised", offset)


def check_layout_tree(entries: list[LayoutEntry]) -> None:
    """No entry may live below a symlink of the same layout (that would write through the link, outside /usr)."""
    links = {e.target for e in entries if e.file_type is LayoutType.SYMLINK}
    if not links:
        return
    for index, entry in enumerate(entries):
        parts = entry.target.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in links:
                raise RecordError(
                    f"layout path {entry.target!r} lies below the symlink {parent!r}", index * LAYOUT_HEADER.size
                )


def encode_layout(entries: Iterable[LayoutEntry], *, nul_terminated: bool = False) -> tuple[bytes, int]:
    parts = []
    count = 0
    for e in entries:
        count += 1
        if e.file_type is LayoutType.REGULAR:
            source = (e.digest or 0).to_bytes(16, "big")
        elif e.file_type is LayoutType.SYMLINK:
            source = (e.source or "").encode() + (b"\0" if nul_terminated else b"")
        else:
            source = b""
        target = e.target.encode() + (b"\0" if nul_terminated else b"")
        parts.append(LAYOUT_HEADER.pack(e.uid, e.gid, e.mode, e.tag, len(source), len(target), e.file_type))
        parts.append(source)
        parts.append(target)
    return b"".join(parts), count


# --- Index ------------------------------------------------------------------------------------------------

def decode_index(data: bytes, num_records: int) -> list[IndexEntry]:
    if len(data) != num_records * INDEX_RECORD.size:
        raise RecordError(
            f"index of {len(data)} bytes does not hold {num_records} records of {INDEX_RECORD.size}", 0
        )
    entries = []
    for i in range(num_records):
        start, end, digest = INDEX_RECORD.unpack_from(data, i * INDEX_RECORD.size)
        if end < start:
            raise RecordError(f"index record ends ({end}) before it starts ({start})", i * INDEX_RECORD.size)
        entries.append(IndexEntry(start, end, int.from_bytes(digest, "big")))
    return entries


def encode_index(entries: Iterable[IndexEntry]) -> tuple[bytes, int]:
    parts = [INDEX_RECORD.pack(e.start, e.end, e.digest.to_bytes(16, "big")) for e in entries]
    return b"".join(parts), len(parts)


# --- Attributes -------------------------------------------------------------------------------------------

def decode_attributes(data: bytes, num_records: int) -> list[tuple[bytes, bytes]]:
    pairs = []
    pos = 0
    for _ in range(num_records):
        if pos + ATTRIBUTE_HEADER.size > len(data):
            raise RecordError("attribute header overruns the payload", pos)
        klen, vlen = ATTRIBUTE_HEADER.unpack_from(data, pos)
        start = pos + ATTRIBUTE_HEADER.size
        if start + klen + vlen > len(data):
            raise RecordError("attribute overruns the payload", pos)
        pairs.append((data[start:start + klen], data[start + klen:start + klen + vlen]))
        pos = start + klen + vlen
    if pos != len(data):
        raise RecordError(f"{len(data) - pos} bytes after the last attribute", pos)
    return pairs
