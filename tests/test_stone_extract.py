"""Extraction writes exactly the verified files, whatever path (inline or writer threads) each one takes."""
from __future__ import annotations

import random

import pytest
import xxhash

from reference_impl.stone import PackageSpec, StoneError, build_package, read_stone
from reference_impl.stone.extract import ExtractOptions, extract, extract_assets, fanout_path
from reference_impl.stone import extract as extract_module
from reference_impl.stone.reader import ContentStream


@pytest.fixture(params=["unnamed", "part"])
def naming(request, monkeypatch):
    """Both ways of naming a finished file: O_TMPFILE + linkat, and ``.part`` + rename where that is missing."""
    if request.param == "part":
        monkeypatch.setattr(extract_module._Namer, "open_unnamed", lambda self, directory, mode: -1)
    return request.param


@pytest.fixture
def package(tmp_path):
    rng = random.Random(7)
    tree = tmp_path / "usr"
    files = {}
    for number in range(150):
        data = rng.randbytes(rng.choice([0, 1, 100, 5000, 70000]))
        path = tree / f"d{number % 7}" / f"f{number}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[xxhash.xxh3_128_intdigest(data)] = data
    return build_package(tree, PackageSpec(name="x", version="1"), tmp_path / "x.stone", level=1), files


@pytest.mark.parametrize("options", [
    ExtractOptions(),
    ExtractOptions(writers=3, block_size=8000, blocks=2, batch_files=3),  # carries and streamed large files
    ExtractOptions(writers=1, block_size=100, blocks=2, batch_files=1),  # almost every file streamed
])
def test_extract_writes_every_unique_file(tmp_path, package, options, naming):
    path, files = package
    out = tmp_path / "out"
    written = extract_assets(read_stone(path), out, options=options)
    assert written == sum(len(d) for d in files.values())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{d:032x}": data for d, data in files.items()}


def test_fanout_and_selection(tmp_path, package):
    path, files = package
    out = tmp_path / "store"
    keep = sorted(files)[:10]
    extract(read_stone(path), fanout_path(out), wanted=lambda e: e.digest in keep)
    got = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in got] == [f"{d:032x}" for d in keep]
    assert all(p.parent.parent.parent == out for p in got)


@pytest.fixture
def one_file(tmp_path):
    """A package of one 10,000-byte file: inside the default block, streamed with 1,000-byte blocks."""
    tree = tmp_path / "usr"
    tree.mkdir()
    (tree / "a").write_bytes(b"A" * 10_000)
    return build_package(tree, PackageSpec(name="c", version="1"), tmp_path / "c.stone", level=1)


in_a_block_or_streamed = pytest.mark.parametrize(
    "options", [ExtractOptions(), ExtractOptions(block_size=1000, blocks=2)], ids=["in-a-block", "streamed"])


@in_a_block_or_streamed
def test_a_corrupt_file_is_never_written(tmp_path, one_file, options, naming):
    stone = read_stone(one_file)
    # same sizes, different bytes: forge the index digest so the content no longer matches it
    (entry,) = stone.index
    stone.index = [type(entry)(entry.start, entry.end, entry.digest ^ 1)]
    with pytest.raises(StoneError, match="does not hash"):
        extract_assets(stone, tmp_path / "out", options=options)
    assert list((tmp_path / "out").iterdir()) == []  # neither under its name nor as a .part


def test_memory_is_bounded_by_the_block_pool(tmp_path, package, monkeypatch):
    """However large the package, extraction holds at most ``blocks`` buffers of ``block_size`` bytes."""
    sizes = []
    original = extract_module._Block.__init__

    def counting(self, size, pool):
        sizes.append(size)
        original(self, size, pool)
    monkeypatch.setattr(extract_module._Block, "__init__", counting)
    path, files = package
    extract_assets(read_stone(path), tmp_path / "out", options=ExtractOptions(block_size=4096, blocks=3))
    assert 2 <= len(sizes) <= 3 and set(sizes) == {4096}
    assert len(list((tmp_path / "out").iterdir())) == len(files)
    sizes.clear()
    tree = tmp_path / "small"
    tree.mkdir()
    (tree / "a").write_bytes(b"tiny")
    small = build_package(tree, PackageSpec(name="s", version="1"), tmp_path / "s.stone", level=1)
    extract_assets(read_stone(small), tmp_path / "small-out")
    assert sizes == [4]  # a small package does not pay for a full-size block


def test_a_writer_error_stops_the_extraction(tmp_path, package, monkeypatch):
    """A writer that fails (here: the destination is below a regular file) ends the extraction with its error,
    also when the decoder is waiting for a block that failing writers hold."""
    path, _files = package
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    reads = []
    original = ContentStream.readinto
    monkeypatch.setattr(ContentStream, "readinto", lambda self, buffer: reads.append(1) or original(self, buffer))
    with pytest.raises(NotADirectoryError):
        extract(read_stone(path), lambda digest: f"{blocker}/{digest:032x}",
                options=ExtractOptions(block_size=4096, blocks=2, batch_files=1))
    content_blocks = read_stone(path).content.plain_size // 4096
    assert len(reads) < content_blocks / 2, "the decoder went on long after the writers had failed"


def test_blocks_are_freed_when_the_extraction_ends(tmp_path, package, monkeypatch):
    """Blocks and their pool refer to each other; without emptying the pool they would wait for the cyclic GC
    and a client installing many packages would hold every extraction's blocks at once."""
    import gc
    import weakref
    blocks = []
    original = extract_module._Block.__init__

    def tracking(self, size, pool):
        original(self, size, pool)
        blocks.append(weakref.ref(self))
    monkeypatch.setattr(extract_module._Block, "__init__", tracking)
    path, _files = package
    gc.disable()
    try:
        extract_assets(read_stone(path), tmp_path / "out", options=ExtractOptions(block_size=4096, blocks=3))
        assert blocks and all(ref() is None for ref in blocks)
    finally:
        gc.enable()


@in_a_block_or_streamed
def test_a_file_that_cannot_take_its_name_leaves_no_part_file(tmp_path, one_file, options, naming):
    stone = read_stone(one_file)
    out = tmp_path / "out"
    (out / f"{stone.index[0].digest:032x}" / "occupied").mkdir(parents=True)  # a directory holds the name
    with pytest.raises(IsADirectoryError):
        extract_assets(stone, out, options=options)
    assert [p.name for p in out.iterdir()] == [f"{stone.index[0].digest:032x}"]


def test_what_is_under_a_name_already_is_replaced(tmp_path, package, naming):
    """Re-extracting over damaged files (as `state verify --repair` does) puts the right bytes in place."""
    path, files = package
    out = tmp_path / "out"
    out.mkdir()
    for digest in files:
        (out / f"{digest:032x}").write_bytes(b"damaged")
    extract_assets(read_stone(path), out, options=ExtractOptions(block_size=8000, blocks=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{d:032x}": data for d, data in files.items()}


def test_unnamed_files_are_used_where_the_filesystem_has_them(tmp_path, package, monkeypatch):
    path, files = package
    renames = []
    monkeypatch.setattr(extract_module.os, "rename", lambda a, b: renames.append(a))
    extract_assets(read_stone(path), tmp_path / "out")
    assert renames == [] and len(list((tmp_path / "out").iterdir())) == len(files)
