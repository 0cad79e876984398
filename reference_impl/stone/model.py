"""Data model of the `.stone` v1 format: enums for the on-disk codes and dataclasses for decoded records."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAGIC = b"\0mos"
INTEGRITY = bytes([0, 0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 4, 0, 0, 5, 0, 0, 6, 0, 0, 7])
FORMAT_VERSION = 1
HEADER_SIZE = 32
PAYLOAD_HEADER_SIZE = 32
# XXH3-128 of b"": the digest every empty file carries.
EMPTY_DIGEST = 0x99AA06D3014798D86001C324468D497F


class FileType(enum.IntEnum):
    BINARY = 1
    DELTA = 2
    REPOSITORY = 3
    BUILD_MANIFEST = 4

    @property
    def label(self) -> str:
        return {1: "binary", 2: "delta", 3: "repository", 4: "manifest"}[self.value]


class PayloadKind(enum.IntEnum):
    META = 1
    CONTENT = 2
    LAYOUT = 3
    INDEX = 4
    ATTRIBUTES = 5


class Compression(enum.IntEnum):
    NONE = 1
    ZSTD = 2


class MetaTag(enum.IntEnum):
    NAME = 1
    ARCHITECTURE = 2
    VERSION = 3
    SUMMARY = 4
    DESCRIPTION = 5
    HOMEPAGE = 6
    SOURCE_ID = 7
    DEPENDS = 8
    PROVIDES = 9
    CONFLICTS = 10
    RELEASE = 11
    LICENSE = 12
    BUILD_RELEASE = 13
    PACKAGE_URI = 14
    PACKAGE_HASH = 15
    PACKAGE_SIZE = 16
    BUILD_DEPENDS = 17
    SOURCE_URI = 18
    SOURCE_PATH = 19
    SOURCE_REF = 20


class Primitive(enum.IntEnum):
    INT8 = 1
    UINT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    STRING = 9
    DEPENDENCY = 10
    PROVIDER = 11


INTEGER_FORMATS = {
    Primitive.INT8: ">b",
    Primitive.UINT8: ">B",
    Primitive.INT16: ">h",
    Primitive.UINT16: ">H",
    Primitive.INT32: ">i",
    Primitive.UINT32: ">I",
    Primitive.INT64: ">q",
    Primitive.UINT64: ">Q",
}


class DependencyKind(enum.IntEnum):
    NAME = 0
    SONAME = 1
    PKGCONFIG = 2
    INTERPRETER = 3
    CMAKE = 4
    PYTHON = 5
    BINARY = 6
    SYSBINARY = 7
    PKGCONFIG32 = 8

    @property
    def label(self) -> str:
        return self.name.lower()


class LayoutType(enum.IntEnum):
    REGULAR = 1
    SYMLINK = 2
    DIRECTORY = 3
    CHARACTER_DEVICE = 4
    BLOCK_DEVICE = 5
    FIFO = 6
    SOCKET = 7

    @property
    def label(self) -> str:
        """Upstream's db/layout entry_type spelling (regular, symlink, character-device, ...)."""
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, order=True)
class Dependency:
    """A dependency or provider: ``kind(name)`` as moss prints it."""

    kind: DependencyKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.label}({self.name})"

    @classmethod
    def parse(cls, text: str) -> "Dependency":
        """Parse ``kind(name)``; a bare ``name`` means ``name(name)``."""
        text = text.strip()
        if text.endswith(")") and "(" in text:
            kind, _, name = text[:-1].partition("(")
            try:
                return cls(DependencyKind[kind.strip().upper()], name)
            except KeyError:
                raise ValueError(f"unknown dependency kind {kind!r} in {text!r}") from None
        return cls(DependencyKind.NAME, text)


@dataclass(frozen=True)
class MetaRecord:
    """One raw Meta record as stored: tag, primitive kind, decoded value (int, str or Dependency)."""

    tag: MetaTag | int
    primitive: Primitive
    value: object


@dataclass
class Meta:
    """The decoded contents of one Meta payload (one package)."""

    name: str = ""
    version: str = ""
    release: int = 0
    build_release: int = 0
    architecture: str = ""
    summary: str = ""
    description: str = ""
    homepage: str = ""
    source_id: str = ""
    licenses: list[str] = field(default_factory=list)
    depends: list[Dependency] = field(default_factory=list)
    provides: list[Dependency] = field(default_factory=list)
    conflicts: list[Dependency] = field(default_factory=list)
    build_depends: list[Dependency] = field(default_factory=list)
    uri: str | None = None
    hash: str | None = None
    size: int | None = None
    source_uri: str | None = None
    source_path: str | None = None
    source_ref: str | None = None
    # The records exactly as decoded, in file order (for byte-identical re-encoding).
    records: list[MetaRecord] = field(default_factory=list)

    @property
    def package_id(self) -> str:
        """moss's id for a package from a local file: ``name-version-release.arch``."""
        return f"{self.name}-{self.version}-{self.release}.{self.architecture}"

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.version}-{self.release}-{self.build_release}-{self.architecture}.stone"

    def all_provides(self) -> list[Dependency]:
        """Provides as moss sees them: the stored ones plus the implicit ``name(<pkg>)``."""
        own = Dependency(DependencyKind.NAME, self.name)
        return self.provides if own in self.provides else [own, *self.provides]


@dataclass(frozen=True)
class LayoutEntry:
    """One Layout record. ``target`` is relative to /usr (no leading slash).

    Regular files carry their XXH3-128 ``digest`` (as an int); symlinks carry their destination in ``source``.
    """

    uid: int
    gid: int
    mode: int
    tag: int
    file_type: LayoutType
    target: str
    digest: int | None = None
    source: str | None = None

    @property
    def usr_path(self) -> str:
        return "/usr/" + self.target


@dataclass(frozen=True)
class IndexEntry:
    """One Index record: [start, end) of the decompressed Content stream and the XXH3-128 digest."""

    start: int
    end: int
    digest: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PayloadHeader:
    stored_size: int
    plain_size: int
    checksum: bytes
    num_records: int
    version: int
    kind: int
    compression: int
    offset: int  # file offset of the payload header itself

    @property
    def body_offset(self) -> int:
        return self.offset + PAYLOAD_HEADER_SIZE

    @property
    def kind_name(self) -> str:
        try:
            return PayloadKind(self.kind).name.capitalize()
        except ValueError:
            return f"Unknown({self.kind})"


def digest_hex(digest: int) -> str:
    """Digest as 32 lower-case hex digits (the form `inspect` and reports show)."""
    return f"{digest:032x}"
