"""The reference package manager (``reference`` or ``moss-compat`` mode) as a system under test.

Every operation is the ``stonelab`` CLI against the root (``-D ROOT --mode M --swap S``), run by the
:class:`~lab.systems.base.CommandRunner` — a subprocess here, the same argv in a guest. Generations are moss
states (the state database's ids), the current one is ``/usr/.stateID``, the tree is ``/usr``
(:func:`lab.probe.observe`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lab import invariants as inv
from lab.faults import corrupt_largest_asset
from lab.invariants import Violation
from lab.packages import PackageDecl, build_packages
from lab.probe import observe
from lab.systems.base import CommandRunner, Generation, Operation, SystemState, run_local
from lab.target import CommandResult

MODES = ("reference", "moss-compat")
INVARIANTS = ("staging_empty", "state_id_matches", "store_integrity")
EVIDENCE = {"staging_empty": "/.moss/root/staging is empty",
            "state_id_matches": "/usr/.stateID names a state of the database",
            "store_integrity": "every asset hashes to its name; no partial asset"}


class ReferenceSystem:
    """The reference implementation on ``root`` in ``mode``; ``workdir`` holds the built ``.stone`` files."""

    operations = frozenset(Operation)
    invariant_names = INVARIANTS
    evidence = EVIDENCE

    def __init__(self, root: Path, workdir: Path, run: CommandRunner = run_local, *, mode: str = "reference",
                 swap: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.name = mode
        self.root = root
        self.workdir = workdir
        self.run = run
        self.mode = mode
        self.swap = swap

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def stonelab(self, *args: str) -> CommandResult:
        """``stonelab ARGS -D ROOT --mode M --swap S`` through the runner."""
        return self.run([sys.executable, "-m", "stonelab.cli", *args, "-D", str(self.root), "--mode", self.mode,
                         "--swap", self.swap])

    def install(self, added: Sequence[PackageDecl], result: Sequence[PackageDecl]) -> CommandResult:
        built, _decls = build_packages({d.key: d for d in added}, self.workdir / "packages")
        return self.stonelab("install", *(str(built[d.key]) for d in added))

    def remove(self, names: Sequence[str], result: Sequence[PackageDecl]) -> CommandResult:
        return self.stonelab("remove", *names)

    def switch(self, number: int) -> CommandResult:
        return self.stonelab("state", "activate", str(number))

    def rollback(self, state: SystemState | None = None) -> CommandResult:
        state = state or self.state()
        older = [g.number for g in state.generations if state.current is not None and g.number < state.current]
        if not older:
            return CommandResult(["stonelab", "state", "activate"], 1, "",
                                 f"no state before the active one ({state.current})\n", 0.0)
        return self.switch(max(older))

    def gc(self, keep: int, state: SystemState | None = None) -> CommandResult:
        return self.stonelab("state", "prune", "--keep", str(keep))  # the verb reads the states itself

    def verify(self) -> CommandResult:
        return self.stonelab("state", "verify")

    def recover(self) -> CommandResult:
        """The recovery verb: ``stonelab state list`` runs recovery under the lock."""
        return self.stonelab("state", "list")

    def corrupt_store(self) -> str:
        return corrupt_largest_asset(self.root)

    def cleanup(self) -> None:
        """Nothing: the root is ordinary files."""

    def state(self) -> SystemState:
        obs = observe(self.root, check_store=False)
        current = int(obs.state_id) if obs.state_id and obs.state_id.isdigit() else None
        return SystemState([Generation(n, str(n)) for n in obs.db_states], current, obs.usr)

    def invariants(self, state: SystemState) -> list[Violation]:
        obs = observe(self.root)
        return inv.staging_empty(obs) + inv.state_id_matches(obs) + inv.store_integrity(obs)
