"""A system run in a guest reads its generations in the guest: gc and the reference's rollback must act on those,
not on the host's view of a root that exists only inside the guest (where they found no generation and did
nothing)."""
from __future__ import annotations

import json
from pathlib import Path

from lab.systems import make_system
from lab.systems.guest import GuestSystem
from lab.target import CommandResult
from vm.transport import RunResult


class GuestStub:
    """What GuestSystem needs of a SystemGuest: power_on and a Python command answering crashcheck's JSON."""

    def __init__(self, generations: list[list], current: int):
        self.answer = json.dumps({"tree": {}, "current": current, "generations": generations, "violations": []})

    def power_on(self) -> None:
        pass

    def _python(self, argv):
        return RunResult(0, self.answer, "")


def recording_runner(commands: list):
    def run(argv, *, env=None, **_):
        commands.append(list(argv))
        return CommandResult(list(argv), 0, "", "", 0.0)
    return run


def guest_system(name: str, tmp_path: Path, generations, current, commands) -> GuestSystem:
    root = tmp_path / "only-in-the-guest"
    inner = make_system(name, root, tmp_path / "work", run=recording_runner(commands), scratch=tmp_path / "s")
    return GuestSystem(inner, GuestStub(generations, current), tmp_path / "s")


def test_nix_gc_deletes_the_generations_the_guest_has(tmp_path):
    commands: list = []
    system = guest_system("nix", tmp_path, [[1, "/nix/store/a"], [2, "/nix/store/b"], [3, "/nix/store/c"]], 3,
                          commands)
    assert system.gc(1).ok
    deleting = [c for c in commands if "--delete-generations" in c]
    assert deleting and deleting[0][-2:] == ["1", "2"]


def test_ostree_gc_undeploys_the_deployments_the_guest_has(tmp_path):
    commands: list = []
    system = guest_system("ostree", tmp_path, [[0, "a.0"], [1, "b.0"], [2, "c.0"]], 0, commands)
    assert system.gc(1).ok
    assert [c[-2:] for c in commands if "undeploy" in c] == [["undeploy", "2"], ["undeploy", "1"]]


def test_reference_rollback_activates_the_state_before_the_guests_current(tmp_path):
    commands: list = []
    system = guest_system("reference", tmp_path, [[1, "1"], [2, "2"]], 2, commands)
    assert system.rollback().ok
    assert commands and commands[-1][3:6] == ["state", "activate", "1"]
