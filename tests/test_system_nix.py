"""Nix 2.8 as a system under test: every adapter operation against a real chroot store, and the invariants
shown to catch a seeded corruption of each kind (store contents, schema file, profile link)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lab.systems import make_system
from lab.systems.base import Operation
from tests.systems_helpers import BASE, HELLO_1, HELLO_2, difference, snapshot

pytestmark = pytest.mark.skipif(shutil.which("nix-env") is None,
                                reason="nix-env is absent (Debian package nix-bin, tools/debian-packages.txt)")


@pytest.fixture
def nix(tmp_path: Path):
    host = snapshot(Path("/nix")), snapshot(Path.home() / ".nix-defexpr"), snapshot(Path.home() / ".cache/nix")
    system = make_system("nix", tmp_path / "root", tmp_path / "work")
    system.prepare()
    yield system
    # nothing of the host changed: its /nix, the invoking user's profile links and caches
    assert (snapshot(Path("/nix")), snapshot(Path.home() / ".nix-defexpr"),
            snapshot(Path.home() / ".cache/nix")) == host


def test_generations_rollback_switch_remove_gc(nix):
    assert nix.state().generations == [] and nix.invariants(nix.state()) == []
    assert nix.install([BASE, HELLO_1], [BASE, HELLO_1]).ok
    state = nix.state()
    assert state.current == 1 and difference(state.tree, [BASE, HELLO_1]) == "identical"
    assert (nix.root / "nix/var/nix/db/schema").read_text() == "10"
    first = state.current_generation().ref
    assert nix.install([HELLO_2], [BASE, HELLO_2]).ok
    assert nix.state().current == 2 and difference(nix.state().tree, [BASE, HELLO_2]) == "identical"
    assert nix.rollback().ok
    assert nix.state().current == 1 and difference(nix.state().tree, [BASE, HELLO_1]) == "identical"
    assert nix.switch(2).ok and nix.state().current == 2
    assert nix.remove(["base"], [HELLO_2]).ok
    state = nix.state()
    assert [g.number for g in state.generations] == [1, 2, 3] and difference(state.tree, [HELLO_2]) == "identical"
    assert nix.verify().ok and nix.invariants(state) == []
    assert nix.gc(1).ok
    state = nix.state()
    assert [g.number for g in state.generations] == [3]
    assert not nix.in_root(first).exists(), "gc left the first generation's store path"
    assert nix.invariants(state) == []


def test_store_contents_changed_after_registration_are_caught(nix):
    assert nix.install([HELLO_1], [HELLO_1]).ok
    victim = nix.in_root(nix.state().current_generation().ref) / "bin/hello"
    os.chmod(victim, 0o644)
    victim.write_text("")  # NixOS/nix#1218/#11457: a registered path with empty contents
    found = nix.invariants(nix.state())
    assert [v.invariant for v in found] == ["nix_store_verified"]
    assert "was modified" in found[0].detail


def test_empty_schema_file_is_caught(nix):
    assert nix.install([HELLO_1], [HELLO_1]).ok
    (nix.root / "nix/var/nix/db/schema").write_text("")  # NixOS/nix#7064
    found = {v.invariant for v in nix.invariants(nix.state())}
    assert "nix_db_valid" in found


def test_profile_naming_an_unregistered_path_is_caught(nix):
    assert nix.install([HELLO_1], [HELLO_1]).ok
    link = nix.profile.parent / "system-2-link"
    link.symlink_to("/nix/store/00000000000000000000000000000000-lab-system")
    os.replace(nix.profile.parent / "system", nix.profile.parent / "old")
    (nix.profile.parent / "system").symlink_to("system-2-link")
    state = nix.state()
    assert state.current == 2
    found = [v for v in nix.invariants(state) if v.invariant == "nix_profile_complete"]
    assert found and any("absent from the store" in v.detail for v in found)


def test_every_operation_is_offered():
    from lab.systems import operations_of
    assert operations_of("nix") == frozenset(Operation)
