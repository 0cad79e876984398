"""Systems under test: one module per system, one registry.

``system:`` in a scenario names one of :data:`SYSTEMS`; :func:`make_system` builds the adapter for a root.
The interface every adapter implements is :class:`lab.systems.base.SystemUnderTest`.
"""
from __future__ import annotations

from pathlib import Path

from lab.systems.base import (CommandRunner, Operation, RootFilesystem, SystemName, SystemUnderTest,
                              UnsupportedOperation, require, run_local)
from lab.systems.nix import NixSystem
from lab.systems.ostree import OstreeSystem
from lab.systems.reference import ReferenceSystem

# name -> (adapter class, Debian package that provides the binaries or "" for the project itself)
SYSTEMS: dict[SystemName, tuple[type, str]] = {
    SystemName.REFERENCE: (ReferenceSystem, ""),
    SystemName.NIX: (NixSystem, "nix-bin"),
    SystemName.OSTREE: (OstreeSystem, "ostree"),
}
# ALICE's contract, judged by the lab on every crash state of a real system (lab.systems.crashcheck)
CRASH_INVARIANTS = ("atomic_usr", "durable_success")

__all__ = ["CRASH_INVARIANTS", "SYSTEMS", "Operation", "RootFilesystem", "SystemName", "SystemUnderTest",
           "UnsupportedOperation", "invariants_of", "make_system", "operations_of", "require"]


def invariants_of(name: str) -> tuple[str, ...]:
    """The invariants a scenario of system ``name`` (not the reference) is judged by, by default all of them."""
    return (*CRASH_INVARIANTS, *SYSTEMS[SystemName(name)][0].invariant_names)


def operations_of(name: str) -> frozenset[Operation]:
    """The operations system ``name`` offers (ValueError for an unknown name)."""
    return SYSTEMS[SystemName(name)][0].operations


def make_system(name: str, root: Path, workdir: Path, *, mode: str = "reference", swap: str = "auto",
                run: CommandRunner = run_local, scratch: Path | None = None) -> SystemUnderTest:
    """The adapter for system ``name`` on ``root``: ``workdir`` on this machine (built packages, source
    store/repository), ``scratch`` writable where ``run`` runs; ``mode``/``swap`` only matter to the reference."""
    cls, _package = SYSTEMS[SystemName(name)]
    if cls is ReferenceSystem:
        return ReferenceSystem(root, workdir, run, mode=mode, swap=swap)
    return cls(root, workdir, run, scratch=scratch)
