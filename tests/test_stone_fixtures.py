"""The real upstream packages and build manifests decode exactly as the facts say."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import xxhash

from reference_impl.stone import FileType, LayoutType, StoneError, read_stone
from reference_impl.stone import codec
from reference_impl.stone.model import EMPTY_DIGEST, PayloadKind
from reference_impl.stone.reader import read_payload_body
from tests.conftest import shared_file

STONES = ("fixtures", "aerynos", "stones")


def stone_path(name: str):
    return shared_file(*STONES, name)


def test_bash_completion_counts_and_content():
    stone = read_stone(stone_path("bash-completion-2.11-1-1-x86_64.stone"))
    assert stone.size == 168_864
    assert stone.file_type is FileType.BINARY
    assert [p.kind for p in stone.payloads] == [PayloadKind.META, PayloadKind.LAYOUT, PayloadKind.INDEX,
                                                PayloadKind.CONTENT]
    counts = {PayloadKind(p.kind): p.num_records for p in stone.payloads}
    assert counts == {PayloadKind.META: 11, PayloadKind.LAYOUT: 745, PayloadKind.INDEX: 474,
                      PayloadKind.CONTENT: 474}
    assert stone.content.plain_size == 872_279
    assert stone.older_writer
    kinds = Counter(e.file_type for e in stone.layout)
    assert kinds == {LayoutType.REGULAR: 474, LayoutType.SYMLINK: 271}
    meta = stone.meta
    assert (meta.name, meta.version, meta.release, meta.build_release) == ("bash-completion", "2.11", 1, 1)
    assert meta.licenses == ["GPL-2.0-or-later"]
    assert [str(p) for p in meta.provides] == ["cmake(bash-completion)"]
    # every streamed file hashes to its index digest; together they are the whole stream
    total = 0
    seen = set()
    for entry, chunks in stone.iter_content():
        data = b"".join(chunks)
        assert xxhash.xxh3_128_intdigest(data) == entry.digest
        total += len(data)
        seen.add(entry.digest)
    assert total == 872_279
    assert {e.digest for e in stone.layout if e.file_type is LayoutType.REGULAR} <= seen
    links = {e.target: e.source for e in stone.layout if e.file_type is LayoutType.SYMLINK}
    assert links["share/bash-completion/completions/7za"] == "7z"


@pytest.mark.parametrize("name, conflicts, path", [
    ("pineapple-1-1-1-x86_64.stone", [], "share/defaults/pienapple"),
    ("italian-pizza-1-1-1-x86_64.stone", ["name(pineapple)"], "share/defaults/italian-pizza"),
])
def test_newer_writer_fixtures(name, conflicts, path):
    stone = read_stone(stone_path(name))
    assert not stone.older_writer
    assert [str(c) for c in stone.meta.conflicts] == conflicts
    assert [e.target for e in stone.layout] == [path]
    (entry,) = stone.layout
    assert entry.digest == EMPTY_DIGEST and entry.mode == 0o100644 and (entry.uid, entry.gid) == (0, 0)
    assert stone.index[0].start == stone.index[0].end == 0
    assert [(e.size, b"".join(c)) for e, c in stone.iter_content()] == [(0, b"")]


@pytest.mark.parametrize("name", ["pineapple-1-1-1-x86_64.stone", "italian-pizza-1-1-1-x86_64.stone"])
def test_newer_writer_records_reencode_byte_identical(name):
    stone = read_stone(stone_path(name))
    bodies = {PayloadKind(p.kind): read_payload_body(stone, p) for p in stone.payloads
              if p.kind != PayloadKind.CONTENT}
    # from the decoded, structured form — not from the raw records
    assert codec.encode_meta(codec.meta_records(stone.meta))[0] == bodies[PayloadKind.META]
    assert codec.encode_layout(stone.layout)[0] == bodies[PayloadKind.LAYOUT]
    assert codec.encode_index(stone.index)[0] == bodies[PayloadKind.INDEX]


def test_older_writer_layout_reencodes_with_nul_terminators():
    stone = read_stone(stone_path("bash-completion-2.11-1-1-x86_64.stone"))
    layout = next(p for p in stone.payloads if p.kind == PayloadKind.LAYOUT)
    body = read_payload_body(stone, layout)
    assert codec.encode_layout(stone.layout, nul_terminated=True)[0] == body
    assert codec.encode_meta(stone.meta.records)[0] == read_payload_body(stone, stone.payloads[0])


def _jsonc(text: str) -> dict:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return json.loads(text)


def _report_form(dep) -> str:
    """boulder's report prints name() dependencies bare."""
    text = str(dep)
    return text[5:-1] if text.startswith("name(") else text


def test_every_manifest_agrees_with_its_report():
    directory = shared_file("fixtures", "aerynos", "manifests")
    bins = sorted(directory.glob("*.bin"))
    assert len(bins) >= 300
    for path in bins:
        report = _jsonc(path.with_suffix(".jsonc").read_text())
        stone = read_stone(path)
        assert stone.file_type is FileType.BUILD_MANIFEST, path
        by_name = {m.name: m for m in stone.metas}
        assert set(by_name) == set(report["packages"]), path
        for name, expected in report["packages"].items():
            meta = by_name[name]
            assert meta.version == report["source-version"], path
            assert meta.release == int(report["source-release"]), path
            assert meta.source_id == report["source-name"], path
            assert meta.build_release == 0, path
            assert sorted(_report_form(d) for d in meta.depends) == sorted(expected.get("depends", [])), (path, name)
            assert sorted(_report_form(p) for p in meta.provides) == sorted(expected.get("provides", [])), (path, name)
            assert sorted(_report_form(b) for b in meta.build_depends) == sorted(expected.get("build-depends", [])), \
                (path, name)


def test_manifest_with_a_flipped_byte_is_rejected(tmp_path):
    source = shared_file("fixtures", "aerynos", "manifests", "acl.bin")
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "acl.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(StoneError, match="Meta"):
        read_stone(bad)
