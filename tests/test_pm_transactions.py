"""The reference package manager end to end on temporary roots: install, remove, rollback, prune, verify, repair,
for both swap strategies, and the stateless policy."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from tests.pm import make_package, pm, state_id, stonelab, usr_tree

STRATEGIES = ["exchange", "symlink"]


@pytest.fixture
def pkgs(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "pkgs"
    return {
        "hello1": make_package(out, "hello", {"bin/hello": "#!/bin/sh\necho 1\n", "share/hello/a": "a"},
                               modes={"bin/hello": 0o755}, symlinks={"bin/hi": "hello"}),
        "hello2": make_package(out, "hello", {"bin/hello": "#!/bin/sh\necho 2\n", "share/hello/b": "b"},
                               version="2.0", modes={"bin/hello": 0o755}, symlinks={"bin/hi": "hello"}),
        "libfoo": make_package(out, "libfoo", {"lib/libfoo.so.1": "foo", "share/empty": ""},
                               provides=["soname(libfoo.so.1(x86_64))"]),
        "app": make_package(out, "app", {"bin/app": "app"}, depends=["soname(libfoo.so.1(x86_64))"]),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_install_upgrade_rollback_prune(root: Path, pkgs, strategy: str):
    pm(root, strategy, "install", str(pkgs["hello1"]), check=True)
    v1 = usr_tree(root)
    assert v1["bin/hello"][0] == "file" and v1["bin/hello"][2] == "0555"  # mode & ~0o222
    assert v1["bin/hi"] == ["symlink", "hello"]
    assert (root / "usr").is_symlink() == (strategy == "symlink")
    assert state_id(root) == 1
    assert (root / "bin").is_symlink() and os.readlink(root / "bin") == "usr/bin"

    pm(root, strategy, "install", str(pkgs["hello2"]), check=True)
    v2 = usr_tree(root)
    assert "share/hello/b" in v2 and "share/hello/a" not in v2
    assert state_id(root) == 2
    assert (root / ".moss/root/1/usr/bin/hello").read_text().endswith("echo 1\n")
    assert not (root / ".moss/root/staging").exists()

    pm(root, strategy, "state", "activate", "1", check=True)
    assert state_id(root) == 1 and usr_tree(root) == v1
    pm(root, strategy, "state", "activate", "2", check=True)
    assert usr_tree(root) == v2

    listing = json.loads(pm(root, strategy, "state", "list", "--json", check=True).stdout)
    assert [(s["id"], s["active"], s["tree"]) for s in listing] == [(1, False, True), (2, True, True)]

    pm(root, strategy, "state", "prune", "--keep", "1", check=True)
    assert not (root / ".moss/root/1").exists()
    with sqlite3.connect(root / ".moss/db/state") as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM state")] == [2]
    with sqlite3.connect(root / ".moss/db/install") as conn:
        assert [r[0] for r in conn.execute("SELECT version_identifier FROM meta")] == ["2.0"]
    assets = [p for p in (root / ".moss/assets/v2").rglob("*") if p.is_file()]
    hello1_only = "#!/bin/sh\necho 1\n"
    assert all(p.read_text() != hello1_only for p in assets), "prune left an orphaned asset"
    assert usr_tree(root) == v2
    assert (root / "etc/hostname").read_text() == "lab\n"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dependencies_remove_and_verify(root: Path, pkgs, strategy: str):
    missing = pm(root, strategy, "install", str(pkgs["app"]))
    assert missing.returncode == 2 and "soname(libfoo.so.1(x86_64))" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    pm(root, strategy, "install", str(pkgs["app"]), str(pkgs["libfoo"]), check=True)
    tree = usr_tree(root)
    assert {"bin/app", "lib/libfoo.so.1", "share/empty"} <= set(tree)
    refused = pm(root, strategy, "remove", "libfoo")
    assert refused.returncode == 2 and "app" in refused.stderr
    pm(root, strategy, "remove", "app", check=True)
    assert "bin/app" not in usr_tree(root) and "lib/libfoo.so.1" in usr_tree(root)
    verified = pm(root, strategy, "state", "verify", "--json", check=True)
    assert json.loads(verified.stdout) == {"problems": [], "ok": True}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_verify_finds_and_repairs_damage(root: Path, pkgs, strategy: str):
    pm(root, strategy, "install", str(pkgs["hello1"]), check=True)
    pm(root, strategy, "install", str(pkgs["hello2"]), check=True)
    usr = (root / "usr").resolve()
    (usr / "bin/hello").unlink()
    (usr / "bin/hello").write_text("tampered")
    (usr / "share/stray").write_text("nobody owns me")
    archived = root / ".moss/root/1/usr/share/hello/a"
    archived.unlink()
    found = pm(root, strategy, "state", "verify", "--json")
    assert found.returncode == 1
    kinds = {(p["state"], p["kind"], p["path"]) for p in json.loads(found.stdout)["problems"]}
    assert (2, "wrong-content", "/usr/bin/hello") in kinds
    assert (2, "unowned", "/usr/share/stray") in kinds
    assert (1, "missing", "/usr/share/hello/a") in kinds
    pm(root, strategy, "state", "verify", "--repair", check=True)
    assert pm(root, strategy, "state", "verify").returncode == 0
    assert (root / "usr/bin/hello").read_text().endswith("echo 2\n")
    assert not (root / "usr/share/stray").exists()
    assert archived.read_text() == "a"


def test_verify_repairs_a_corrupt_asset_and_reports_392(root: Path, pkgs, tmp_path: Path):
    pkg = pkgs["libfoo"]
    pm(root, "exchange", "install", str(pkg), check=True)
    asset = next(p for p in (root / ".moss/assets/v2").rglob("*") if p.is_file() and p.read_bytes() == b"foo")
    os.chmod(asset, 0o644)
    asset.write_text("bar")
    found = pm(root, "exchange", "state", "verify")
    assert found.returncode == 1 and "asset" in found.stdout
    pm(root, "exchange", "state", "verify", "--repair", check=True)
    assert asset.read_bytes() == b"foo"
    asset.write_text("bar")
    pkg.unlink()  # upstream #392: without the package file there is nothing to repair from
    gone = pm(root, "exchange", "state", "verify", "--repair")
    assert gone.returncode == 1 and "#392" in gone.stdout


def test_empty_files_get_fresh_inodes(root: Path, tmp_path: Path):
    files = {f"share/empty/{i}": "" for i in range(50)}
    pkg = make_package(tmp_path / "p", "empties", files)
    pm(root, "exchange", "install", str(pkg), check=True)
    inodes = {os.stat(root / "usr" / rel).st_ino for rel in files}
    assert len(inodes) == len(files)  # upstream #372: one shared inode runs into EMLINK


def test_conflicting_fixture_packages(root: Path):
    from tests.conftest import shared_file
    stones = shared_file("fixtures", "aerynos", "stones")
    pineapple = next(stones.glob("pineapple*.stone"))
    pizza = next(stones.glob("italian-pizza*.stone"))
    result = pm(root, "exchange", "install", str(pineapple), str(pizza))
    assert result.returncode == 2 and "conflict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (root / "usr").exists()


def test_moss_compat_refuses_symlink_and_leaves_no_intent(root: Path, pkgs):
    refused = pm(root, "symlink", "install", str(pkgs["hello1"]), mode="moss-compat")
    assert refused.returncode == 2 and "RENAME_EXCHANGE" in refused.stderr
    pm(root, "exchange", "install", str(pkgs["hello1"]), mode="moss-compat", check=True)
    assert state_id(root) == 1 and not (root / ".moss/intent.json").exists()


def test_stateless_transaction_never_touches_etc_or_var(root: Path, pkgs):
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/data").write_text("keep")
    before = {p: p.stat().st_mtime_ns for p in [root / "etc/hostname", root / "var/lib/data"]}
    pm(root, "exchange", "install", str(pkgs["hello1"]), check=True)
    pm(root, "exchange", "install", str(pkgs["hello2"]), check=True)
    pm(root, "exchange", "state", "activate", "1", check=True)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["hostname"]


def test_bad_input_is_one_line(root: Path, tmp_path: Path, pkgs):
    corrupt = tmp_path / "corrupt.stone"
    data = bytearray(pkgs["hello1"].read_bytes())
    data[-10] ^= 0xFF
    corrupt.write_bytes(data)
    cases = [
        ("install", str(corrupt)),
        ("install", str(tmp_path / "missing.stone")),
        ("install", "nosuchname"),
        ("state", "activate", "42"),
        ("state", "remove", "7"),
    ]
    pm(root, "exchange", "install", str(pkgs["hello1"]), check=True)
    for case in cases:
        result = pm(root, "exchange", *case)
        assert result.returncode == 2, (case, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stonelab: error: "), (case, result.stderr)
    bad_fault = stonelab("state", "list", "-D", str(root), fault="nowhere:crash")
    assert bad_fault.returncode == 2 and "blit.begin" in bad_fault.stderr
    active = pm(root, "exchange", "state", "remove", "1")
    assert active.returncode == 2 and "active" in active.stderr
    assert not any(p.name.endswith(".part") for p in (root / ".moss").rglob("*"))


def test_install_by_name_from_a_repository_and_sync(root: Path, tmp_path: Path):
    from reference_impl.stone import write_repository_index
    repo = tmp_path / "repo"
    make_package(repo, "libfoo", {"lib/libfoo.so.1": "foo"}, provides=["soname(libfoo.so.1(x86_64))"])
    make_package(repo, "app", {"bin/app": "app 1"}, depends=["soname(libfoo.so.1(x86_64))"])
    write_repository_index(repo)
    pm(root, "exchange", "install", "--repo", str(repo), "app", check=True)
    assert (root / "usr/lib/libfoo.so.1").read_text() == "foo"  # pulled in as a dependency
    shown = json.loads(pm(root, "exchange", "state", "show", "--json", check=True).stdout)
    assert sorted(d["name"] for d in shown["package_details"]) == ["app", "libfoo"]
    with sqlite3.connect(root / ".moss/db/state") as conn:
        explicit = dict(conn.execute("SELECT package_id, explicit FROM state_selections"))
    assert sorted(explicit.values()) == [0, 1]  # app explicit, libfoo pulled in
    assert pm(root, "exchange", "sync", "--repo", str(repo), check=True).stdout.strip() == "everything is up to date"
    make_package(repo, "app", {"bin/app": "app 2"}, release=2)
    write_repository_index(repo)
    pm(root, "exchange", "sync", "--repo", str(repo), check=True)
    assert (root / "usr/bin/app").read_text() == "app 2" and state_id(root) == 2
    unknown = pm(root, "exchange", "install", "--repo", str(repo), "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr


@pytest.mark.parametrize("damage", ["truncated", "appended", "other-build"])
def test_repository_file_not_matching_its_index_is_refused_before_anything_changes(root: Path, tmp_path: Path,
                                                                                   damage: str):
    """os-tools#309: size and sha256 from stone.index are compared with the file before it is used; the
    dependency (a good file) is not taken into the store either."""
    import hashlib

    from reference_impl.stone import write_repository_index
    repo = tmp_path / "repo"
    make_package(repo, "libfoo", {"lib/libfoo.so.1": "foo"}, provides=["soname(libfoo.so.1(x86_64))"])
    app = make_package(repo, "app", {"bin/app": "app 1"}, depends=["soname(libfoo.so.1(x86_64))"])
    write_repository_index(repo)
    good = app.read_bytes()
    other = make_package(tmp_path / "other", "app", {"bin/app": "app rebuilt"},
                         depends=["soname(libfoo.so.1(x86_64))"]).read_bytes()
    app.write_bytes({"truncated": good[:len(good) * 2 // 3], "appended": good + b"<html>502</html>\n",
                     "other-build": other}[damage])
    refused = pm(root, "exchange", "install", "--repo", str(repo), "app")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    message = refused.stderr.strip()
    assert str(app) in message and "stone.index" in message
    assert hashlib.sha256(good).hexdigest() in message and hashlib.sha256(app.read_bytes()).hexdigest() in message
    assert not (root / "usr").exists() and state_id(root) is None
    assert not [p for p in (root / ".moss/assets").rglob("*") if p.is_file()]
    app.write_bytes(good)
    pm(root, "exchange", "install", "--repo", str(repo), "app", check=True)
    assert (root / "usr/bin/app").read_text() == "app 1"


def test_auto_swap_falls_back_to_symlink_without_rename_exchange(root: Path, pkgs, monkeypatch, capsys):
    """Linux accepts RENAME_EXCHANGE on every writable filesystem this host has (ext2 is served by the ext4
    driver); Asterinas returns EINVAL on ext2. The syscall is made to answer as Asterinas does."""
    import errno

    from reference_impl import swap
    from stonelab.cli import main

    def asterinas_ext2(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(swap, "renameat2_exchange", asterinas_ext2)
    import reference_impl.transaction as transaction
    monkeypatch.setattr(transaction, "renameat2_exchange", asterinas_ext2)
    works, reason = swap.exchange_supported(root / ".probe")
    assert not works and "Invalid argument" in reason

    def run(*args: str) -> int:
        verb, rest = (args[:2], args[2:]) if args[0] == "state" else (args[:1], args[1:])
        return main([*verb, "-D", str(root), *rest])
    assert run("install", str(pkgs["hello1"])) == 0
    assert (root / "usr").is_symlink() and os.readlink(root / "usr") == ".moss/root/1/usr"
    assert run("install", str(pkgs["hello2"])) == 0
    assert run("state", "activate", "1") == 0
    assert state_id(root) == 1 and "share/hello/a" in usr_tree(root)
    capsys.readouterr()
    assert run("install", "--swap", "exchange", str(pkgs["hello2"])) == 2
    assert "symlink strategy" in capsys.readouterr().err
    fresh = root.parent / "fresh"
    fresh.mkdir()
    assert main(["install", "-D", str(fresh), "--mode", "moss-compat", str(pkgs["hello1"])]) == 1
    assert "EINVAL" in capsys.readouterr().err  # upstream simply fails on such a kernel


def test_verify_reports_a_package_owning_a_path_outside_usr(root: Path, pkgs):
    """The reader refuses such layouts; a database written by something else is still checked."""
    pm(root, "exchange", "install", str(pkgs["libfoo"]), check=True)
    with sqlite3.connect(root / ".moss/db/layout") as conn:
        conn.execute("UPDATE layout SET entry_value2 = '../etc/shadow' WHERE entry_value2 = 'lib/libfoo.so.1'")
    found = pm(root, "exchange", "state", "verify", "--json")
    problems = json.loads(found.stdout)["problems"]
    assert found.returncode == 1
    assert {"kind": "outside-usr", "path": "../etc/shadow"}.items() <= next(
        p for p in problems if p["kind"] == "outside-usr").items()
    repaired = pm(root, "exchange", "state", "verify", "--repair")
    assert repaired.returncode == 1 and not (root / "etc/shadow").exists()
    refused = pm(root, "exchange", "install", str(pkgs["hello1"]))
    assert refused.returncode == 2 and "outside /usr" in refused.stderr
    assert not (root / "etc/shadow").exists()


def test_verify_repairs_a_corrupt_mode_variant_in_one_pass(root: Path, tmp_path: Path):
    """A file whose mode differs from its asset's is a hard link to a variant ``<asset>.<mode>.<uid>.<gid>``
    in the store; a corrupt variant was flagged but only repaired by a second `--repair` (issue 14's finding)."""
    pkg = make_package(tmp_path, "tool", {"bin/tool": "#!/bin/sh\necho tool\n", "share/tool/doc": "doc\n"},
                       modes={"bin/tool": 0o700})
    pm(root, "exchange", "install", str(pkg), check=True)
    variant = next(p for p in (root / ".moss/assets/v2").rglob("*.*.*.*") if p.is_file())
    os.chmod(variant, 0o600)
    variant.write_text("damaged\n")
    found = pm(root, "exchange", "state", "verify")
    assert found.returncode == 1 and "variant" in found.stdout
    pm(root, "exchange", "state", "verify", "--repair", check=True)
    again = pm(root, "exchange", "state", "verify")
    assert again.returncode == 0, again.stdout
    assert (root / "usr/bin/tool").read_text() == "#!/bin/sh\necho tool\n"
    assert stat.S_IMODE((root / "usr/bin/tool").stat().st_mode) == 0o700 & ~0o222  # as every blit gives it


def _rewrite_index(index: Path, change) -> None:
    from reference_impl.stone import codec, read_stone
    from reference_impl.stone.model import FileType, PayloadKind
    from reference_impl.stone.writer import write_record_file
    metas = change(read_stone(index).metas)
    payloads = [(PayloadKind.META, *codec.encode_meta(codec.meta_records(m))) for m in metas]
    write_record_file(index, FileType.REPOSITORY, payloads)


def _entry(field: str, value):
    def change(metas):
        for meta in metas:
            setattr(meta, field, value)
        return metas
    return change


def _twice(metas):
    import copy
    other = copy.deepcopy(metas[0])
    other.hash = "0" * 64
    return metas + [other]


@pytest.mark.parametrize("change, message", [
    (_entry("uri", "/dev/zero"), "PackageURI '/dev/zero' is not a file inside the repository"),
    (_entry("uri", "../outside.stone"), "PackageURI '../outside.stone' is not a file inside the repository"),
    (_entry("uri", "fifo"), "fifo: listed in stone.index but not a regular file"),
    (_entry("hash", "zz" * 32), "PackageHash 'zzzz"),
    (_entry("hash", "ab"), "PackageHash 'ab' is not a sha256"),
    (_twice, "app release 1 build 1 is listed twice with different files"),
], ids=["device", "outside", "fifo", "not-hex", "short-hash", "twice"])
def test_a_hostile_repository_index_is_one_line_and_never_hangs(root: Path, tmp_path: Path, change,
                                                                 message: str) -> None:
    """An index naming a device, a FIFO (both never end), a file outside the repository, a malformed hash, or
    one build twice with different files: one line, nothing installed, within the timeout."""
    from reference_impl.stone import write_repository_index
    repo = tmp_path / "repo"
    app = make_package(repo, "app", {"bin/app": "app 1"})
    (tmp_path / "outside.stone").write_bytes(app.read_bytes())
    os.mkfifo(repo / "fifo")
    _rewrite_index(write_repository_index(repo), change)
    refused = stonelab("install", "-D", str(root), "--repo", str(repo), "app")
    assert refused.returncode == 2 and message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and state_id(root) is None


def test_index_hashes_in_upper_case_and_identical_duplicates_are_one_package(root: Path, tmp_path: Path) -> None:
    from reference_impl.client import repository_candidates
    from reference_impl.stone import write_repository_index
    repo = tmp_path / "repo"
    app = make_package(repo, "app", {"bin/app": "app 1"})
    import copy
    import hashlib
    _rewrite_index(write_repository_index(repo), lambda ms: [copy.deepcopy(ms[0]) for _ in "ab"])
    _rewrite_index(repo / "stone.index", _entry("hash", hashlib.sha256(app.read_bytes()).hexdigest().upper()))
    candidates = repository_candidates(repo)
    assert [c.package_id for c in candidates] == [hashlib.sha256(app.read_bytes()).hexdigest()]
    stonelab("install", "-D", str(root), "--repo", str(repo), "app", check=True)
    assert (root / "usr/bin/app").read_text() == "app 1"


def test_a_package_file_that_changes_after_its_check_is_not_committed(root: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    """A download still running (resumed, or replaced by rename) between the index check and the unpack: the
    bytes used are no longer the checked ones, so nothing is committed."""
    from reference_impl.client import Client
    from reference_impl.stone import write_repository_index
    from stonelab.cli import main
    repo = tmp_path / "repo"
    app = make_package(repo, "app", {"bin/app": "app 1"})
    write_repository_index(repo)
    intake = Client._intake

    def intake_then_grow(self, candidate):
        intake(self, candidate)
        with open(app, "ab") as handle:
            handle.write(b"more bytes of a resumed download")
    monkeypatch.setattr(Client, "_intake", intake_then_grow)
    assert main(["install", "-D", str(root), "--repo", str(repo), "app"]) == 2
    assert "changed while it was being installed" in capsys.readouterr().err
    assert state_id(root) is None and not (root / "usr").exists()
