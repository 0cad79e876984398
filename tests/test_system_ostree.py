"""OSTree 2022.7 as a system under test: every adapter operation against a real sysroot, the operation it lacks
refused in one line, and the invariants shown to catch a seeded corruption (an object, the loader symlink, an
entry's kernel)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lab.systems import make_system
from lab.systems.base import Operation, UnsupportedOperation, require
from lab.systems.ostree import remove_root
from tests.systems_helpers import BASE, HELLO_1, HELLO_2, difference

pytestmark = pytest.mark.skipif(shutil.which("ostree") is None,
                                reason="ostree is absent (Debian package ostree, tools/debian-packages.txt)")


@pytest.fixture
def ostree(tmp_path: Path):
    system = make_system("ostree", tmp_path / "root", tmp_path / "work")
    system.prepare()
    yield system
    remove_root(system.root)  # deployments are immutable (chattr +i); pytest could not remove them
    assert not system.root.exists()


def test_deploy_upgrade_rollback_remove_gc(ostree):
    assert ostree.state().generations == [] and ostree.invariants(ostree.state()) == []
    assert ostree.install([BASE, HELLO_1], [BASE, HELLO_1]).ok
    state = ostree.state()
    assert state.current == 0 and difference(state.tree, [BASE, HELLO_1]) == "identical"
    assert os.readlink(ostree.root / "boot/loader") == "loader.1"
    first = state.generations[0].ref
    assert ostree.install([HELLO_2], [BASE, HELLO_2]).ok
    state = ostree.state()
    assert [g.ref for g in state.generations][1] == first
    assert difference(state.tree, [BASE, HELLO_2]) == "identical"
    assert os.readlink(ostree.root / "boot/loader") == "loader.0", "the entry set was not swapped"
    assert ostree.rollback().ok
    state = ostree.state()
    assert [g.ref for g in state.generations] == [first]
    assert difference(state.tree, [BASE, HELLO_1]) == "identical"
    assert ostree.remove(["base"], [HELLO_1]).ok
    assert difference(ostree.state().tree, [HELLO_1]) == "identical"
    assert ostree.verify().ok and ostree.invariants(ostree.state()) == []
    assert ostree.gc(1).ok
    state = ostree.state()
    assert len(state.generations) == 1 and not (ostree.deploy_dir() / first).exists()
    assert ostree.invariants(state) == []


def test_switch_is_refused_in_one_line(ostree):
    with pytest.raises(UnsupportedOperation) as err:
        require(ostree, Operation.SWITCH, "scenarios/x.yaml: steps[1]")
    assert str(err.value).count("\n") == 0
    assert str(err.value).startswith("scenarios/x.yaml: steps[1]: system 'ostree' has no 'switch' operation")


def test_corrupt_object_is_caught_by_fsck(ostree):
    assert ostree.install([HELLO_1], [HELLO_1]).ok
    objects = [p for p in (ostree.repo / "objects").rglob("*.file") if not p.is_symlink() and p.stat().st_size > 0]
    victim = objects[0]
    os.chmod(victim, 0o644)
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    assert "ostree_fsck" in {v.invariant for v in ostree.invariants(ostree.state())}


def test_broken_loader_and_missing_kernel_are_caught(ostree):
    assert ostree.install([HELLO_1], [HELLO_1]).ok
    entry = next((ostree.root / "boot/loader/entries").glob("*.conf"))
    kernel = ostree.root / "boot" / next(line.split()[1] for line in entry.read_text().splitlines()
                                         if line.startswith("linux ")).lstrip("/")
    kernel.unlink()
    found = ostree.invariants(ostree.state())
    assert any(v.invariant == "ostree_loader_complete" and "linux" in v.detail for v in found)
    loader = ostree.root / "boot/loader"
    loader.unlink()
    loader.symlink_to("loader.0")  # names an entry set that was never written
    found = ostree.invariants(ostree.state())
    assert any(v.invariant == "ostree_loader_complete" and "loader.0/entries is missing" in v.detail
               for v in found)
