"""Corrupt and hostile `.stone` files: always a StoneError naming file, payload and offset — never a hang,
never another exception type; the CLI prints one line and exits 2."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference_impl.stone import StoneError, read_stone
from reference_impl.stone import codec
from reference_impl.stone.extract import ExtractOptions, extract_assets
from reference_impl.stone.model import Compression, FileType, IndexEntry, LayoutEntry, LayoutType, Meta, PayloadKind
from reference_impl.stone.reader import ARCHIVE_HEADER, Limits, PAYLOAD_HEADER
from reference_impl.stone.model import INTEGRITY, MAGIC
from tests.conftest import shared_file


def read_fully(path: Path, **kwargs) -> None:
    stone = read_stone(path, **kwargs)
    for _entry, chunks in stone.iter_content():
        for _ in chunks:
            pass


def extract_fully(path: Path, **kwargs) -> None:
    with tempfile.TemporaryDirectory() as out:
        # tiny blocks: files straddle blocks and large ones are streamed, so every path of extract is exercised
        extract_assets(read_stone(path, **kwargs), Path(out), options=ExtractOptions(block_size=64, blocks=2))


def assert_rejected(path: Path, payload: str | None = None, match: str | None = None, **kwargs) -> StoneError:
    """Every way of reading the content (iteration, verification alone, parallel extraction) refuses alike."""
    with pytest.raises(StoneError) as extracting:
        extract_fully(path, **kwargs)
    with pytest.raises(StoneError) as verifying:
        read_stone(path, **kwargs).verify_content()
    with pytest.raises(StoneError) as info:
        read_fully(path, **kwargs)
    err = info.value
    for other in (extracting.value, verifying.value):
        assert (other.payload, other.problem) == (err.payload, err.problem)
    assert err.file == str(path)
    assert err.payload, f"no payload named in {err}"
    if payload:
        assert err.payload == payload, str(err)
    if match:
        assert match in err.problem, str(err)
    assert "\n" not in str(err)
    return err


# --- crafting files ---------------------------------------------------------------------------------------

def payload(kind: int, body: bytes, records: int, *, compression: int = Compression.ZSTD, stored: bytes | None = None,
            plain_size: int | None = None, stored_size: int | None = None, version: int = 1) -> bytes:
    if stored is None:
        stored = zstandard.ZstdCompressor().compress(body) if compression == Compression.ZSTD else body
    header = PAYLOAD_HEADER.pack(len(stored) if stored_size is None else stored_size,
                                 len(body) if plain_size is None else plain_size,
                                 xxhash.xxh3_64_digest(stored), records, version, kind, compression)
    return header + stored


def archive(*payloads: bytes, file_type: int = FileType.BINARY, version: int = 1, magic: bytes = MAGIC,
            count: int | None = None) -> bytes:
    return ARCHIVE_HEADER.pack(magic, len(payloads) if count is None else count, INTEGRITY, file_type,
                               version) + b"".join(payloads)


def meta_payload(name: str = "demo") -> bytes:
    meta = Meta(name=name, version="1", release=1, build_release=1, architecture="x86_64", summary="s",
                description="d", homepage="h", source_id=name)
    body, count = codec.encode_meta(codec.meta_records(meta))
    return payload(PayloadKind.META, body, count)


def package(files: dict[str, bytes], *, layout_override: list[LayoutEntry] | None = None, **content_kw) -> bytes:
    content = b""
    index = []
    layout = []
    for target, data in files.items():
        digest = xxhash.xxh3_128_intdigest(data)
        if digest not in {e.digest for e in index}:
            index.append(IndexEntry(len(content), len(content) + len(data), digest))
            content += data
        layout.append(LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, target, digest))
    layout_body, layout_count = codec.encode_layout(layout_override if layout_override is not None else layout)
    index_body, index_count = codec.encode_index(index)
    return archive(
        meta_payload(),
        payload(PayloadKind.LAYOUT, layout_body, layout_count),
        payload(PayloadKind.INDEX, index_body, index_count),
        payload(PayloadKind.CONTENT, content, 0, **content_kw),
    )


@pytest.fixture
def write(tmp_path):
    def _write(data: bytes, name: str = "bad.stone") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return _write


def test_crafted_package_is_valid(write):
    path = write(package({"share/a": b"hello", "share/b": b"hello", "bin/c": b"x" * 1000}))
    stone = read_stone(path)
    assert sorted(e.target for e in stone.layout) == ["bin/c", "share/a", "share/b"]
    assert sum(len(b"".join(c)) for _e, c in stone.iter_content()) == 1005


# --- the bad inputs the issue names -----------------------------------------------------------------------

def test_truncated_anywhere(write):
    data = package({"share/a": b"hello world" * 100})
    for cut in (0, 5, 31, 32, 40, 63, 64, len(data) // 2, len(data) - 1):
        assert_rejected(write(data[:cut]))


def test_wrong_magic(write):
    assert_rejected(write(archive(meta_payload(), magic=b"\0moz")), "header", "not a .stone file")


def test_unknown_version(write):
    err = assert_rejected(write(archive(meta_payload(), version=2)), "header", "unsupported format version 2")
    assert err.offset == 28


def test_payload_size_past_end_of_file(write):
    body, count = codec.encode_index([IndexEntry(0, 0, 1)])
    data = archive(meta_payload(), payload(PayloadKind.INDEX, body, count, stored_size=10**12))
    err = assert_rejected(write(data), "Index", "past the end of the file")
    assert err.offset == 32 + len(meta_payload())


def test_plain_size_that_lies(write):
    meta = meta_payload()
    stored_len = len(meta) - 32
    body, count = codec.encode_meta(codec.meta_records(Meta(name="x", version="1", release=1, build_release=1,
                                                              architecture="a", summary="s", description="d",
                                                              homepage="h", source_id="x")))
    for lie in (len(body) - 1, len(body) + 1, 0):
        assert_rejected(write(archive(payload(PayloadKind.META, body, count, plain_size=lie))), "Meta",
                        "plain_size")
    assert stored_len > 0


def test_content_plain_size_that_lies(write):
    assert_rejected(write(package({"a": b"abc" * 100}, plain_size=10)), "Content")
    assert_rejected(write(package({"a": b"abc" * 100}, plain_size=10**6)), "Content")


def test_zstd_bomb_stops_at_the_limit(write):
    bomb = b"\0" * (64 * 2**20)
    data = archive(payload(PayloadKind.META, bomb, 0))
    err = assert_rejected(write(data), "Meta", "exceeds the limit", limits=Limits(max_record_payload=2**20))
    assert err.offset == 32 + 8
    # and a frame that inflates past a lying, small plain_size is stopped after plain_size + 1 bytes
    assert_rejected(write(archive(payload(PayloadKind.META, bomb, 0, plain_size=100))), "Meta", "past")


def test_content_bomb_refused_before_inflating(write):
    data = package({"a": b"x"}, plain_size=2**40)
    assert_rejected(write(data), "Content", "exceeds the limit")


def test_layout_records_overrunning_their_payload(write):
    layout = codec.LAYOUT_HEADER.pack(0, 0, 0o100644, 0, 16, 500, LayoutType.REGULAR) + b"\0" * 16 + b"short"
    data = archive(meta_payload(), payload(PayloadKind.LAYOUT, layout, 1))
    assert_rejected(write(data), "Layout", "overruns")
    # more records claimed than present
    body, _ = codec.encode_layout([LayoutEntry(0, 0, 0o40755, 0, LayoutType.DIRECTORY, "share")])
    assert_rejected(write(archive(meta_payload(), payload(PayloadKind.LAYOUT, body, 3))), "Layout", "overruns")


@pytest.mark.parametrize("target, problem", [
    ("/etc/passwd", "absolute"),
    ("../etc/passwd", "escapes /usr"),
    ("share/../../etc/shadow", "escapes /usr"),
    ("share/a\0b", "NUL"),
    ("share//x", "not normalised"),
    ("./x", "not normalised"),
])
def test_malicious_layout_paths(write, target, problem):
    entry = LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, "placeholder", xxhash.xxh3_128_intdigest(b"x"))
    body, count = codec.encode_layout([entry])
    body = body.replace(b"placeholder", b"")  # re-pack with the hostile target
    raw = target.encode()
    body = codec.LAYOUT_HEADER.pack(0, 0, 0o100644, 0, 16, len(raw), LayoutType.REGULAR) + \
        xxhash.xxh3_128_digest(b"x") + raw
    err = assert_rejected(write(archive(meta_payload(), payload(PayloadKind.LAYOUT, body, count))), "Layout",
                          problem)
    assert err.offset is not None


def test_path_below_a_symlink_of_the_same_layout_is_refused(write):
    digest = xxhash.xxh3_128_intdigest(b"pwned")
    layout = [LayoutEntry(0, 0, 0o120777, 0, LayoutType.SYMLINK, "lib", None, "/etc"),
              LayoutEntry(0, 0, 0o100644, 0, LayoutType.REGULAR, "lib/passwd", digest)]
    assert_rejected(write(package({"x": b"pwned"}, layout_override=layout)), "Layout", "below the symlink")


def test_file_digest_mismatch_in_content(write):
    data = bytearray(package({"share/a": b"A" * 4096}))
    # replace the content payload by one whose bytes differ but whose checksum is right
    good = package({"share/a": b"A" * 4096})
    content_at = good.rfind(zstandard.ZstdCompressor().compress(b"A" * 4096)) - 32
    forged = payload(PayloadKind.CONTENT, b"B" * 4096, 0)
    data = bytes(data[:content_at]) + forged
    assert_rejected(write(data), "Content", "does not hash")


def test_trailing_garbage(write):
    assert_rejected(write(package({"a": b"1"}) + b"junk"), "archive", "trailing")


def test_cli_prints_one_line_and_exits_2(write, tmp_path):
    path = write(package({"a": b"1"})[:50])
    result = subprocess.run([sys.executable, "-m", "stonelab.cli", "inspect", str(path)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr


def test_cli_missing_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stonelab.cli", "inspect", str(tmp_path / "nope.stone")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


# --- any single-byte corruption of a real package is detected ---------------------------------------------

def _corrupt_all(source: Path, tmp_path: Path, positions, values=(0x01, 0x80, 0xFF)) -> None:
    original = source.read_bytes()
    target = tmp_path / source.name
    for position in positions:
        for xor in values:
            data = bytearray(original)
            data[position] ^= xor
            target.write_bytes(bytes(data))
            for reader in (read_fully, extract_fully):
                try:
                    reader(target)
                except StoneError as err:
                    assert err.payload, f"byte {position} ^ {xor:#x}: {err}"
                else:
                    pytest.fail(f"byte {position} ^ {xor:#x} of {source.name} went unnoticed by {reader.__name__}")


@pytest.mark.parametrize("name", ["pineapple-1-1-1-x86_64.stone", "italian-pizza-1-1-1-x86_64.stone"])
def test_every_single_byte_corruption_of_small_packages(tmp_path, name):
    source = shared_file("fixtures", "aerynos", "stones", name)
    _corrupt_all(source, tmp_path, range(source.stat().st_size))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0, max_value=168_863), value=st.integers(min_value=1, max_value=255))
def test_single_byte_corruption_of_bash_completion(tmp_path, position, value):
    source = shared_file("fixtures", "aerynos", "stones", "bash-completion-2.11-1-1-x86_64.stone")
    _corrupt_all(source, tmp_path, [position], [value])


def test_every_header_byte_of_bash_completion(tmp_path):
    source = shared_file("fixtures", "aerynos", "stones", "bash-completion-2.11-1-1-x86_64.stone")
    stone = read_stone(source)
    positions = list(range(32)) + [p.offset + i for p in stone.payloads for i in range(32)]
    _corrupt_all(source, tmp_path, positions, values=(0x01, 0xFF))
