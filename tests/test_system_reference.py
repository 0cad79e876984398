"""The reference implementation behind the system-under-test interface: the same operations as Nix and OSTree,
through the `stonelab` CLI, in both modes."""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.systems import SYSTEMS, make_system, operations_of
from lab.systems.base import Operation
from tests.systems_helpers import BASE, HELLO_1, HELLO_2, difference


@pytest.mark.parametrize("mode", ["reference", "moss-compat"])
def test_operations_through_the_cli(tmp_path: Path, mode: str):
    swap = "symlink" if mode == "reference" else "auto"  # upstream only has RENAME_EXCHANGE
    system = make_system("reference", tmp_path / "root", tmp_path / "work", mode=mode, swap=swap)
    system.prepare()
    assert system.name == mode
    assert system.install([BASE, HELLO_1], [BASE, HELLO_1]).ok
    first = system.state()
    assert difference(first.tree, [BASE, HELLO_1]) == "identical"
    assert system.install([HELLO_2], [BASE, HELLO_2]).ok
    assert difference(system.state().tree, [BASE, HELLO_2]) == "identical"
    assert system.rollback().ok
    assert system.state().current == first.current
    assert difference(system.state().tree, [BASE, HELLO_1]) == "identical"
    assert system.remove(["base"], [HELLO_1]).ok
    assert difference(system.state().tree, [HELLO_1]) == "identical"
    assert system.gc(1).ok and len(system.state().generations) == 1
    assert system.verify().ok and system.invariants(system.state()) == []


def test_rollback_without_an_older_state_fails(tmp_path: Path):
    system = make_system("reference", tmp_path / "root", tmp_path / "work")
    system.prepare()
    assert system.install([HELLO_1], [HELLO_1]).ok
    result = system.rollback()
    assert not result.ok and "no state before" in result.stderr


def test_registry_names_the_systems_and_their_packages():
    assert set(SYSTEMS) == {"reference", "nix", "ostree"}
    assert Operation.SWITCH not in operations_of("ostree")
    assert SYSTEMS["nix"][1] == "nix-bin" and SYSTEMS["ostree"][1] == "ostree"
