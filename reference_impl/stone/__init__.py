"""The `.stone` v1 package format: reader, writer and repository index (byte-compatible with upstream moss)."""
from reference_impl.stone.errors import StoneError
from reference_impl.stone.model import (
    EMPTY_DIGEST,
    Dependency,
    DependencyKind,
    FileType,
    IndexEntry,
    LayoutEntry,
    LayoutType,
    Meta,
    MetaTag,
    PayloadKind,
    digest_hex,
)
from reference_impl.stone.reader import StoneFile, read_stone
from reference_impl.stone.writer import PackageSpec, build_package, build_package_from_files, load_spec
from reference_impl.stone.repository import write_repository_index

__all__ = [
    "EMPTY_DIGEST", "Dependency", "DependencyKind", "FileType", "IndexEntry", "LayoutEntry", "LayoutType",
    "Meta", "MetaTag", "PackageSpec", "PayloadKind", "StoneError", "StoneFile", "build_package",
    "build_package_from_files", "digest_hex",
    "load_spec", "read_stone", "write_repository_index",
]
