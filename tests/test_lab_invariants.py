"""Invariants judge observations of real directory trees against the packages' own declaration."""
from __future__ import annotations

import os
from pathlib import Path

import xxhash

from lab import invariants as inv
from lab.invariants import ExpectedTree
from lab.probe import observe
from lab.scenario import PackageDecl
from lab.packages import expected_tree


def _root(tmp_path, files: dict[str, str], links: dict[str, str] | None = None):
    root = tmp_path / "root"
    for rel, content in files.items():
        path = root / "usr" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    for rel, dest in (links or {}).items():
        path = root / "usr" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(dest, path)
    return root


A = PackageDecl(key="a", name="a", version="1", files={"bin/a": "one"}, symlinks={"bin/aa": "a"})
B = PackageDecl(key="b", name="b", version="1", files={"share/b": "bee"})


def test_atomic_usr_accepts_exactly_the_declared_tree(tmp_path):
    root = _root(tmp_path, {"bin/a": "one", "share/b": "bee", "lib/os-release": "ID=x\n"}, {"bin/aa": "a"})
    found, matched = inv.atomic_usr(observe(root), [expected_tree([A]), expected_tree([A, B])])
    assert found == [] and matched.label == "{a, b}"


def test_atomic_usr_catches_a_mixture(tmp_path):
    root = _root(tmp_path, {"bin/a": "two", "share/b": "bee"}, {"bin/aa": "a"})
    found, matched = inv.atomic_usr(observe(root), [expected_tree([A]), expected_tree([A, B])])
    assert matched is None and found[0].invariant == "atomic_usr"
    assert "different: /usr/bin/a" in found[0].detail


def test_atomic_usr_catches_a_partial_tree_and_a_wrong_link(tmp_path):
    root = _root(tmp_path, {"bin/a": "one"}, {"bin/aa": "elsewhere"})
    found, _ = inv.atomic_usr(observe(root), [expected_tree([A, B])])
    assert "missing: /usr/share/b" in found[0].detail and "different: /usr/bin/aa" in found[0].detail


def test_symlinked_usr_is_followed(tmp_path):
    root = tmp_path / "root"
    tree = root / ".moss" / "root" / "3" / "usr"
    (tree / "share").mkdir(parents=True)
    (tree / "share" / "b").write_text("bee")
    (tree / ".stateID").write_text("3")
    os.symlink(".moss/root/3/usr", root / "usr")
    obs = observe(root)
    assert obs.usr_is_symlink == ".moss/root/3/usr" and obs.state_id == "3"
    assert inv.atomic_usr(obs, [expected_tree([B])])[0] == []
    obs.db_states = [3]
    assert inv.state_id_matches(obs) == []
    obs.usr_is_symlink = ".moss/root/2/usr"
    assert "points to" in inv.state_id_matches(obs)[0].detail


def test_staging_and_state_id(tmp_path):
    root = _root(tmp_path, {"bin/a": "one", ".stateID": "7"})
    (root / ".moss" / "root" / "staging" / "usr").mkdir(parents=True)
    obs = observe(root)
    assert inv.staging_empty(obs)[0].invariant == "staging_empty"
    assert "does not know" in inv.state_id_matches(obs)[0].detail


def test_stateless_catches_writes_outside_usr(tmp_path):
    root = _root(tmp_path, {"bin/a": "one"})
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("lab\n")
    baseline = observe(root).outside
    os.symlink("usr/bin", root / "bin")
    assert inv.stateless(observe(root), baseline) == []
    (root / "etc" / "hostname").write_text("changed\n")
    (root / "var").mkdir()
    found = inv.stateless(observe(root), baseline)
    assert found and "/etc/hostname" in found[0].detail and "/var/" in found[0].detail
    os.remove(root / "bin")
    os.symlink("/etc", root / "bin")
    assert any("/bin" in v.detail for v in inv.stateless(observe(root), baseline))


def test_store_integrity(tmp_path):
    root = tmp_path / "root"
    good = b"content"
    name = f"{xxhash.xxh3_128_intdigest(good):x}"
    asset = root / ".moss" / "assets" / "v2" / name[:2] / name[2:4] / name[4:6] / name
    asset.parent.mkdir(parents=True)
    asset.write_bytes(good)
    assert inv.store_integrity(observe(root)) == []
    asset.write_bytes(b"rotten")
    (asset.parent / "abc.part").write_bytes(b"")
    found = inv.store_integrity(observe(root))
    assert {v.detail.split(" ")[1] for v in found} == {"asset(s)", "partial"}


def test_expected_tree_from_declarations():
    tree = expected_tree([A, B])
    assert tree.files["share/b"] == ["file", f"{xxhash.xxh3_128_intdigest(b'bee'):032x}"]
    assert tree.files["bin/aa"] == ["symlink", "a"]
    assert isinstance(tree, ExpectedTree)


def test_observing_an_installation_leaves_nothing_open_below_it(root, tmp_path):
    """The crash engine unmounts each crash state after observing it; an SQLite connection left open by
    observe() kept the mount busy (umount: EBUSY) in the guest."""
    from tests.pm import make_package, pm
    from reference_impl.boot.states import read_state_ids

    pm(root, "exchange", "install", str(make_package(tmp_path, "hello", {"bin/hello": "hi\n"})), check=True)
    obs = observe(root)
    assert read_state_ids(root) == [1] and obs.state_id == "1"
    open_below = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir()
                  if os.path.exists(fd) and os.readlink(fd).startswith(str(root))]
    assert open_below == []
