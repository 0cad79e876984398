"""Judging one crash state of a real system: its state and invariants read where the disk is, ALICE's contract
decided on the lab's side.

Nix and OSTree have no recovery verb of their own: the *next command* is their recovery (Nix opens its SQLite
database, which replays or discards the WAL; OSTree reads the sysroot's deployments and entries). So the check of
a state is :meth:`SystemUnderTest.state` plus :meth:`SystemUnderTest.invariants` — whose commands (``nix
path-info``, ``nix store verify``, ``ostree admin status``, ``ostree fsck``) are that next command.

*ALICE's contract* (Pillai et al., "All File Systems Are Not Created Equal", OSDI '14): an operation that reported
success survives a crash; any other leaves the old state or the new one, never neither and never a mix. Here:
``atomic_usr`` (the generation a boot would use holds the old or the new package set exactly) and
``durable_success`` (after the operation returned exit 0, only the new one is acceptable).

``python -m lab.systems.crashcheck SYSTEM ROOT SCRATCH`` prints :func:`observe_system`'s JSON (run in a guest).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from lab import invariants as inv
from lab.invariants import ExpectedTree, Violation
from lab.probe import Observation
from lab.systems import CRASH_INVARIANTS, make_system
from lab.systems.base import CommandRunner, run_local

__all__ = ["CRASH_INVARIANTS", "judge_system_state", "observe_system"]


def observe_system(system: str, root: Path, scratch: Path, run: CommandRunner = run_local, *,
                   recover: bool = False) -> dict:
    """The state of system ``system`` on ``root`` and its own invariants, JSON-ready:
    ``{"tree", "current", "generations": [[number, ref]], "violations": [{"invariant", "detail"}]}``; with
    ``recover`` (a crash state) the system's own recovery runs first (:meth:`SystemUnderTest.recover`) and
    ``"recovery": {"exit", "output"}`` says how it went (absent: the system has none beyond its next command)."""
    sut = make_system(system, root, scratch, run=run, scratch=scratch)
    recovery = sut.recover() if recover else None
    state = sut.state()
    observed = {"tree": state.tree, "current": state.current,
                "generations": [[g.number, g.ref] for g in state.generations],
                "violations": [asdict(v) for v in sut.invariants(state)]}
    if recovery is not None:
        observed["recovery"] = {"exit": recovery.returncode,
                                "output": (recovery.stdout + recovery.stderr).strip()[-1500:]}
    return observed


def judge_system_state(observed: dict, old: ExpectedTree, new: ExpectedTree, *, succeeded: bool,
                       after_return: bool, enabled: tuple[str, ...]) -> list[Violation]:
    """Violations of one crash state (``observed``: :func:`observe_system`'s dict). ``succeeded``: the operation
    exited 0; ``after_return``: the cut came after it had returned."""
    violations: list[Violation] = []
    found, matched = inv.atomic_usr(Observation(usr=observed["tree"]), [old, new])
    if "atomic_usr" in enabled:
        violations += found
    if succeeded and after_return and matched is not new and "durable_success" in enabled:
        what = f"the old tree {old.label}" if matched is old else "neither tree"
        violations.append(Violation("durable_success", "the operation had reported success (exit 0), but after "
                                                       f"the cut the current generation holds {what}"))
    violations += [Violation(**v) for v in observed["violations"] if v["invariant"] in enabled]
    return violations


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3:
        print("usage: python -m lab.systems.crashcheck SYSTEM ROOT SCRATCH", file=sys.stderr)
        return 2
    print(json.dumps(observe_system(args[0], Path(args[1]), Path(args[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
