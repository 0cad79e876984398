"""Write → read is the identity: records, whole packages built from trees, repository indexes, the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference_impl.stone import (
    Dependency, DependencyKind, FileType, LayoutType, PackageSpec, build_package, read_stone,
)
from reference_impl.stone import codec
from reference_impl.stone.model import EMPTY_DIGEST, IndexEntry, LayoutEntry, Meta

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
name_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.+", min_size=1, max_size=20)
deps = st.lists(st.builds(Dependency, st.sampled_from(list(DependencyKind)), name_text), max_size=5)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def metas(draw) -> Meta:
    return Meta(
        name=draw(name_text), version=draw(name_text), release=draw(u64), build_release=draw(u64),
        architecture=draw(name_text), summary=draw(text), description=draw(text), homepage=draw(text),
        source_id=draw(name_text), licenses=draw(st.lists(text, max_size=3)), depends=draw(deps),
        provides=[d for d in draw(deps) if d.kind is not DependencyKind.NAME], conflicts=draw(deps),
        build_depends=draw(deps),
    )


def _public(meta: Meta) -> dict:
    fields = dict(vars(meta))
    fields.pop("records")
    return fields


@given(metas())
def test_meta_roundtrip(meta):
    body, count = codec.encode_meta(codec.meta_records(meta))
    decoded = codec.decode_meta(body, count)
    assert _public(decoded) == _public(meta)
    assert codec.encode_meta(codec.meta_records(decoded))[0] == body


path_component = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
layout_entries = st.builds(
    LayoutEntry,
    uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1), mode=st.integers(0, 2**32 - 1),
    tag=st.just(0), file_type=st.sampled_from([LayoutType.REGULAR, LayoutType.DIRECTORY]),
    target=st.lists(path_component, min_size=1, max_size=4).map("/".join),
    digest=st.integers(0, 2**128 - 1),
).map(lambda e: e if e.file_type is LayoutType.REGULAR else LayoutEntry(e.uid, e.gid, e.mode, 0, e.file_type,
                                                                        e.target))


@given(st.lists(layout_entries, max_size=20), st.booleans())
def test_layout_roundtrip(entries, nul_terminated):
    body, count = codec.encode_layout(entries, nul_terminated=nul_terminated)
    decoded, older = codec.decode_layout(body, count)
    assert decoded == entries
    assert older == (nul_terminated and bool(entries))


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**20), st.integers(0, 2**128 - 1)), max_size=30))
def test_index_roundtrip(rows):
    entries = [IndexEntry(start, start + size, digest) for start, size, digest in rows]
    body, count = codec.encode_index(entries)
    assert codec.decode_index(body, count) == entries


# --- whole packages from trees ----------------------------------------------------------------------------

tree_files = st.dictionaries(
    st.lists(path_component, min_size=1, max_size=3).map("/".join),
    st.one_of(st.binary(max_size=3000), st.sampled_from([b"", b"shared", b"shared"])),
    min_size=1, max_size=12,
)


def _make_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Materialise, dropping paths that collide with a file used as a directory."""
    made = {}
    for rel, data in sorted(files.items()):
        target = root / rel
        if any((root / "/".join(rel.split("/")[:i])).is_file() for i in range(1, rel.count("/") + 1)):
            continue
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        made[rel] = data
    return made


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=tree_files, spec_meta=metas())
def test_package_roundtrip(tmp_path_factory, files, spec_meta):
    work = tmp_path_factory.mktemp("pkg")
    tree = work / "usr"
    tree.mkdir()
    files = _make_tree(tree, files)
    os.symlink("some/where", tree / "ZZ-link")
    (tree / "EMPTY-dir").mkdir()
    spec = PackageSpec(name=spec_meta.name, version=spec_meta.version, release=spec_meta.release % 1000,
                       summary="s", license=["MIT"], depends=[str(d) for d in spec_meta.depends],
                       provides=[str(p) for p in spec_meta.provides], conflicts=[str(c) for c in spec_meta.conflicts])
    out = build_package(tree, spec, work / "p.stone", level=1)
    stone = read_stone(out)
    assert stone.file_type is FileType.BINARY
    assert stone.meta.name == spec.name and stone.meta.depends == spec_meta.depends
    by_path = {e.target: e for e in stone.layout}
    assert set(by_path) == set(files) | {"ZZ-link", "EMPTY-dir"}
    assert by_path["ZZ-link"].source == "some/where"
    assert by_path["EMPTY-dir"].file_type is LayoutType.DIRECTORY
    contents = {e.digest: b"".join(c) for e, c in stone.iter_content()}
    assert len(contents) == len(set(files.values()))  # de-duplicated
    for rel, data in files.items():
        assert contents[by_path[rel].digest] == data
        assert by_path[rel].mode == os.stat(tree / rel).st_mode
    sizes = [e.size for e in sorted(stone.index, key=lambda e: e.start)]
    assert sizes == sorted(sizes, reverse=True)  # largest files first


def test_owner_and_mode_overrides(tmp_path):
    tree = tmp_path / "usr"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    spec = PackageSpec(name="t", version="1", owners={"bin/tool": (0, 5)}, modes={"bin/tool": 0o4755})
    stone = read_stone(build_package(tree, spec, tmp_path / "t.stone"))
    (entry,) = stone.layout
    assert (entry.uid, entry.gid, entry.mode) == (0, 5, 0o104755)


def test_empty_file_digest(tmp_path):
    tree = tmp_path / "usr"
    tree.mkdir()
    (tree / "e").write_bytes(b"")
    stone = read_stone(build_package(tree, PackageSpec(name="e", version="1"), tmp_path / "e.stone"))
    assert stone.layout[0].digest == EMPTY_DIGEST == xxhash.xxh3_128_intdigest(b"")


# --- repository index and CLI -----------------------------------------------------------------------------

def _stonelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stonelab.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_repository_index_and_cli(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, dep in (("alpha", []), ("beta", ["name(alpha)", "soname(libalpha.so.1(x86_64))"])):
        tree = tmp_path / name
        (tree / "share" / name).mkdir(parents=True)
        (tree / "share" / name / "README").write_text(f"{name}\n")
        (tmp_path / f"{name}.yaml").write_text(json.dumps({
            "name": name, "version": "1.0", "release": 2, "summary": f"{name} pkg", "license": "MIT",
            "depends": dep, "provides": [f"binary({name})"], "conflicts": []}))
        result = _stonelab("stone", "build", tree, "-o", repo / f"{name}-1.0-2-1-x86_64.stone")
        assert result.returncode == 0, result.stderr
    result = _stonelab("stone", "index", repo)
    assert result.returncode == 0, result.stderr
    index = read_stone(repo / "stone.index")
    assert index.file_type is FileType.REPOSITORY
    assert [m.name for m in index.metas] == ["alpha", "beta"]
    for meta in index.metas:
        package = repo / meta.uri
        assert meta.hash == hashlib.sha256(package.read_bytes()).hexdigest()
        assert meta.size == package.stat().st_size
    result = _stonelab("inspect", "--json", repo / "beta-1.0-2-1-x86_64.stone", repo / "stone.index")
    assert result.returncode == 0, result.stderr
    beta, idx = [json.loads(line) for line in result.stdout.splitlines()]
    assert beta["type"] == "binary" and idx["type"] == "repository"
    (pkg,) = beta["packages"]
    assert pkg["depends"] == ["name(alpha)", "soname(libalpha.so.1(x86_64))"]
    assert pkg["provides"] == ["binary(beta)"] and pkg["release"] == 2 and pkg["licenses"] == ["MIT"]
    assert beta["layout"] == [{"path": "/usr/share/beta/README", "type": "regular", "mode": "0644", "uid": 0,
                               "gid": 0, "digest": f"{xxhash.xxh3_128_intdigest(b'beta' + bytes([10])):032x}"}]
    assert len(idx["packages"]) == 2 and idx["packages"][1]["uri"] == "beta-1.0-2-1-x86_64.stone"


def test_build_with_a_broken_metadata_file(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    for content, problem in (("name: [unclosed", "not valid YAML"), ("- a\n- b\n", "expected a mapping"),
                             ("name: x\n", "missing required field 'version'"),
                             ("name: x\nversion: 1\ncolour: red\n", "unknown field")):
        (tmp_path / "t.yaml").write_text(content)
        result = _stonelab("stone", "build", tree, "-o", tmp_path / "t.stone")
        assert result.returncode == 2 and problem in result.stderr and "t.yaml" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.stone").exists()
