"""Directory metadata survives packaging: `stone build` records every directory whose mode or owner is not
0755 root:root (not only empty ones, as upstream's builder), every blit strategy applies it, `state verify`
checks it (and --repair restores it)."""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from reference_impl.blit import BlitOptions, BlitStrategy, blit
from reference_impl.stone import LayoutType, PackageSpec, build_package, read_stone
from reference_impl.store import Store
from tests.pm import pm
from tests.test_blit import btrfs_mount

SPEC = dict(name="dirs", version="1", release=1, summary="directory metadata", license=["MPL-2.0"],
            depends=[], provides=[], conflicts=[])


def dir_tree(tree: Path) -> Path:
    for rel, mode in (("share/plain", 0o755), ("share/private", 0o750), ("share/spool", 0o1777),
                      ("lib/service", 0o755), ("share/empty", 0o755), ("share/setgid", 0o2775)):
        (tree / rel).mkdir(parents=True, exist_ok=True)
        if rel != "share/empty":
            (tree / rel / "file").write_text(rel)
        os.chmod(tree / rel, mode)
    for rel in ("share", "lib"):
        os.chmod(tree / rel, 0o755)
    return tree


@pytest.fixture
def package(tmp_path: Path) -> Path:
    spec = PackageSpec(**SPEC, owners={"lib/service": (0, 42)}, modes={})
    return build_package(dir_tree(tmp_path / "tree"), spec, tmp_path / "dirs-1-1-1-x86_64.stone", level=3)


def test_build_records_every_directory_with_non_default_metadata(package: Path) -> None:
    dirs = {e.target: (stat.S_IMODE(e.mode), e.uid, e.gid) for e in read_stone(package).layout
            if e.file_type is LayoutType.DIRECTORY}
    assert dirs == {"share/private": (0o750, 0, 0), "share/spool": (0o1777, 0, 0), "lib/service": (0o755, 0, 42),
                    "share/empty": (0o755, 0, 0), "share/setgid": (0o2775, 0, 0)}


@pytest.mark.parametrize("strategy", [BlitStrategy.HARDLINK, BlitStrategy.COPY, BlitStrategy.REFLINK])
def test_every_blit_strategy_applies_directory_metadata(package: Path, tmp_path: Path,
                                                        strategy: BlitStrategy) -> None:
    with contextlib.ExitStack() as stack:
        # Reflinks need a filesystem that clones: a loop-mounted btrfs.
        base = stack.enter_context(btrfs_mount(tmp_path)) if strategy is BlitStrategy.REFLINK else tmp_path
        stone = read_stone(package)
        store = Store(base / "assets" / "v2")
        store.add(stone)
        usr = base / "usr"
        usr.mkdir()
        report = blit(stone.layout, store.path, usr, BlitOptions(strategy=strategy))
        assert report.strategy is strategy
        _check_directories(usr)


def _check_directories(usr: Path) -> None:
    for rel, mode in (("share/private", 0o750), ("share/spool", 0o1777), ("share/setgid", 0o2775),
                      ("share/plain", 0o755), ("share/empty", 0o755)):
        assert stat.S_IMODE((usr / rel).stat().st_mode) == mode, rel
    if os.geteuid() == 0:
        st = (usr / "lib/service").stat()
        assert (st.st_uid, st.st_gid) == (0, 42)


@pytest.mark.parametrize("swap, blit_strategy", [("exchange", "hardlink"), ("symlink", "copy")])
def test_state_verify_checks_directory_metadata_and_repair_restores_it(root: Path, package: Path, swap: str,
                                                                      blit_strategy: str) -> None:
    pm(root, swap, "install", "--blit", blit_strategy, str(package), check=True)
    usr = (root / "usr").resolve()
    assert stat.S_IMODE((usr / "share/spool").stat().st_mode) == 0o1777
    assert pm(root, swap, "state", "verify").returncode == 0
    os.chmod(usr / "share/spool", 0o755)
    os.chmod(usr / "share/private", 0o777)
    if os.geteuid() == 0:
        os.chown(usr / "lib/service", 0, 0)
    found = pm(root, swap, "state", "verify", "--json")
    assert found.returncode != 0
    problems = {(p["kind"], p["path"], p["detail"]) for p in json.loads(found.stdout)["problems"]}
    assert ("wrong-mode", "/usr/share/spool/", "mode 0755, expected 1777") in problems
    assert ("wrong-mode", "/usr/share/private/", "mode 0777, expected 0750") in problems
    if os.geteuid() == 0:
        assert ("wrong-owner", "/usr/lib/service/", "owner 0:0, expected 0:42") in problems
    pm(root, swap, "state", "verify", "--repair", check=True)
    assert pm(root, swap, "state", "verify").returncode == 0
    usr = (root / "usr").resolve()
    assert stat.S_IMODE((usr / "share/spool").stat().st_mode) == 0o1777


NESTED = {"share/sg": (0o2775, 0, 42), "share/sg/sub": (0o2770, 1000, 42), "share/spool": (0o1777, 0, 0),
          "share/spool/inner": (0o1770, 1000, 1000), "lib/ro": (0o555, 0, 0), "lib/ro/x": (0o700, 1000, 1000),
          "lib/suid": (0o4755, 0, 0), "share/emptyowned": (0o750, 1000, 1000)}


@pytest.fixture
def nested_package(tmp_path: Path) -> Path:
    """Nested set-gid and sticky directories with non-root owners, a read-only parent of a private child."""
    tree = tmp_path / "nested"
    for rel in sorted(NESTED):
        (tree / rel).mkdir(parents=True, exist_ok=True)
        if rel != "share/emptyowned":
            (tree / rel / "f").write_text(rel)
    (tree / "share/sg/sub/deep").mkdir()
    (tree / "share/sg/sub/deep/f").write_text("deep")
    for rel in sorted(NESTED, key=lambda r: -r.count("/")):
        os.chmod(tree / rel, NESTED[rel][0])
    for rel in ("share", "lib", "share/sg/sub/deep"):
        os.chmod(tree / rel, 0o755)
    spec = PackageSpec(**SPEC, owners={rel: owner[1:] for rel, owner in NESTED.items()}, modes={})
    return build_package(tree, spec, tmp_path / "nested-1-1-1-x86_64.stone", level=3)


@pytest.mark.parametrize("strategy", [BlitStrategy.HARDLINK, BlitStrategy.COPY, BlitStrategy.REFLINK])
def test_nested_setgid_sticky_and_owned_directories_through_every_strategy(nested_package: Path, tmp_path: Path,
                                                                           strategy: BlitStrategy) -> None:
    stone = read_stone(nested_package)
    assert {e.target: (stat.S_IMODE(e.mode), e.uid, e.gid) for e in stone.layout
            if e.file_type is LayoutType.DIRECTORY} == NESTED
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(btrfs_mount(tmp_path)) if strategy is BlitStrategy.REFLINK else tmp_path
        store = Store(base / "assets" / "v2")
        store.add(stone)
        usr = base / "usr"
        usr.mkdir()
        blit(stone.layout, store.path, usr, BlitOptions(strategy=strategy))
        for rel, (mode, uid, gid) in NESTED.items():
            st = (usr / rel).stat()
            assert stat.S_IMODE(st.st_mode) == mode, rel
            if os.geteuid() == 0:
                assert (st.st_uid, st.st_gid) == (uid, gid), rel
        assert stat.S_IMODE((usr / "share/sg/sub/deep").stat().st_mode) == 0o755   # no set-gid inherited


def test_state_verify_catches_nested_bits_and_directories_no_layout_lists(root: Path, nested_package: Path) -> None:
    """A set-gid or sticky bit dropped below another such directory, and a parent no layout lists (made 0755
    root:root by the blit) whose mode or group changed."""
    pm(root, "exchange", "install", str(nested_package), check=True)
    usr = (root / "usr").resolve()
    assert pm(root, "exchange", "state", "verify").returncode == 0
    os.chmod(usr / "share/sg/sub", 0o770)
    os.chmod(usr / "share/spool/inner", 0o770)
    os.chmod(usr / "share", 0o775)
    if os.geteuid() == 0:
        os.chown(usr / "share/sg/sub/deep", 0, 5)
    found = pm(root, "exchange", "state", "verify", "--json")
    problems = {(p["kind"], p["path"], p["detail"]) for p in json.loads(found.stdout)["problems"]}
    assert {("wrong-mode", "/usr/share/sg/sub/", "mode 0770, expected 2770"),
            ("wrong-mode", "/usr/share/spool/inner/", "mode 0770, expected 1770"),
            ("wrong-mode", "/usr/share/", "mode 0775, expected 0755")} <= problems
    if os.geteuid() == 0:
        assert ("wrong-owner", "/usr/share/sg/sub/deep/", "owner 0:5, expected 0:0") in problems
    pm(root, "exchange", "state", "verify", "--repair", check=True)
    assert pm(root, "exchange", "state", "verify").returncode == 0
    assert stat.S_IMODE((root / "usr").resolve().joinpath("share").stat().st_mode) == 0o755
