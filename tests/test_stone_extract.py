"""Extraction writes exactly the verified files, whatever path (inline or writer threads) each one takes."""
from __future__ import annotations

import random

import pytest
import xxhash

from reference_impl.stone import PackageSpec, StoneError, build_package, read_stone
from reference_impl.stone.extract import ExtractOptions, extract, extract_assets, fanout_path


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
    ExtractOptions(writers=3, inline_limit=1000, batch_bytes=10_000, batch_files=3, max_in_flight=20_000),
    ExtractOptions(inline_limit=0),
])
def test_extract_writes_every_unique_file(tmp_path, package, options):
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


def test_a_corrupt_file_never_gets_its_final_name(tmp_path):
    tree = tmp_path / "usr"
    tree.mkdir()
    (tree / "a").write_bytes(b"A" * 10_000)
    path = build_package(tree, PackageSpec(name="c", version="1"), tmp_path / "c.stone", level=1)
    stone = read_stone(path)
    # same sizes, different bytes: forge the index digest so the content no longer matches it
    (entry,) = stone.index
    stone.index = [type(entry)(entry.start, entry.end, entry.digest ^ 1)]
    with pytest.raises(StoneError, match="does not hash"):
        extract_assets(stone, tmp_path / "out")
    assert not any(p.suffix != ".part" for p in (tmp_path / "out").iterdir())
