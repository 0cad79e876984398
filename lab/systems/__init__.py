"""Systems under test: one module per system, one registry.

``system:`` in a scenario names one of :data:`SYSTEMS`; :func:`make_system` builds the adapter for a root.
The interface every adapter implements is :class:`lab.systems.base.SystemUnderTest`.
"""
from __future__ import annotations

from pathlib import Path

from lab.systems.base import CommandRunner, Operation, SystemUnderTest, UnsupportedOperation, require, run_local
from lab.systems.nix import NixSystem
from lab.systems.ostree import OstreeSystem
from lab.systems.reference import ReferenceSystem

# name -> (adapter class, Debian package that provides the binaries or "" for the project itself)
SYSTEMS: dict[str, tuple[type, str]] = {
    "reference": (ReferenceSystem, ""),
    "nix": (NixSystem, "nix-bin"),
    "ostree": (OstreeSystem, "ostree"),
}

__all__ = ["SYSTEMS", "Operation", "SystemUnderTest", "UnsupportedOperation", "make_system", "operations_of",
           "require"]


def operations_of(name: str) -> frozenset[Operation]:
    """The operations system ``name`` offers (KeyError for an unknown name)."""
    return SYSTEMS[name][0].operations


def make_system(name: str, root: Path, workdir: Path, *, mode: str = "reference", swap: str = "auto",
                run: CommandRunner = run_local, scratch: Path | None = None) -> SystemUnderTest:
    """The adapter for system ``name`` on ``root``: ``workdir`` on this machine (built packages, source
    store/repository), ``scratch`` writable where ``run`` runs; ``mode``/``swap`` only matter to the reference."""
    cls, _package = SYSTEMS[name]
    if cls is ReferenceSystem:
        return ReferenceSystem(root, workdir, run, mode=mode, swap=swap)
    return cls(root, workdir, run, scratch=scratch)
