"""The system-under-test interface: what the lab needs from any transactional system it judges.

A system under test (the reference package manager in either mode, Nix, OSTree) is driven through the same
few verbs whatever its own vocabulary is:

=============  ====================================  =============================  ==========================
operation      reference / moss-compat               nix                            ostree
=============  ====================================  =============================  ==========================
install        ``stonelab install`` (new state)      ``nix copy`` + ``nix-env --set`` ``pull-local`` + ``admin deploy``
remove         ``stonelab remove``                   a generation without them      a commit without them
switch         ``stonelab state activate ID``        ``--switch-generation N``      (none: no CLI to reorder)
rollback       ``state activate`` of the previous    ``nix-env --rollback``         ``admin undeploy 0``
gc             ``state prune --keep N``              ``--delete-generations`` + gc  ``undeploy`` + ``cleanup``
verify         ``stonelab state verify``             ``nix store verify --no-trust`` ``ostree fsck``
=============  ====================================  =============================  ==========================

An operation a system lacks is refused before anything runs (:func:`require`), in one line. Every command runs
through a :class:`CommandRunner` — on this machine by default; the crash engine runs the same argv in a guest.
A *generation* is the lab's neutral word for a moss state, a Nix profile generation and an OSTree deployment.
"""
from __future__ import annotations

import enum
import itertools
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lab.invariants import Violation
from lab.packages import PackageDecl
from lab.target import COMMAND_TIMEOUT, CommandResult
from stonelab.errors import StonelabError


class SystemName(enum.StrEnum):
    """The systems a scenario can name (``system:``); the reference takes ``mode: reference|moss-compat``."""

    REFERENCE = "reference"
    NIX = "nix"
    OSTREE = "ostree"


class RootFilesystem(enum.StrEnum):
    """The SUT root's file system in a guest (``filesystem:``, vm target only)."""

    EXT4 = "ext4"  # journaled (data=ordered), journal commit only when something forces it
    EXT2 = "ext2"  # no journal: Asterinas 0.18.1's only persistent root file system


class Operation(enum.StrEnum):
    """The verbs a scenario can ask of any system (see the module table)."""

    INSTALL = "install"
    REMOVE = "remove"
    SWITCH = "switch"
    ROLLBACK = "rollback"
    GC = "gc"
    VERIFY = "verify"


class UnsupportedOperation(StonelabError):
    """A scenario asks a system for an operation it does not have (one line, exit status 2)."""


class MissingTool(StonelabError):
    """The system's binaries are not installed here; the message names the Debian package."""


class SetupError(StonelabError):
    """The lab could not set a system up (prepare a root, build a generation on its side): one line."""


@dataclass(frozen=True)
class Generation:
    """One generation: ``number`` is the system's own id (moss state id, Nix generation number, OSTree
    deployment index — 0 is the default), ``ref`` what it points at (store path, ``csum.serial``)."""

    number: int
    ref: str


@dataclass
class SystemState:
    """What a system holds now, read from its root without trusting the lab's model.

    ``tree`` is the current generation's ``/usr``-relative tree in :func:`lab.probe.walk`'s format
    (``rel -> ["file", xxh3-128 hex, mode] | ["symlink", dest]``), minus files the system itself adds;
    ``current`` the number of the generation a boot would use (None: none yet).
    """

    generations: list[Generation] = field(default_factory=list)
    current: int | None = None
    tree: dict[str, list] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what made the state unreadable, one line each

    def current_generation(self) -> Generation | None:
        return next((g for g in self.generations if g.number == self.current), None)


class CommandRunner(Protocol):
    """Runs one argv where the system's root is; returns its exit status and output (never raises on a
    non-zero exit; raises :class:`MissingTool` when the program does not exist)."""

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> CommandResult: ...


def run_local(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> CommandResult:
    """The host :class:`CommandRunner`: a subprocess with ``env`` added to this process's environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    started = time.monotonic()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=full_env, cwd=cwd,
                              timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MissingTool(f"{argv[0]}: not installed (see tools/debian-packages.txt)") from None
    return CommandResult(list(argv), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


class SystemUnderTest(Protocol):
    """One transactional system on one root. ``name`` is what a scenario's ``system:`` says; ``operations``
    the verbs it has; ``invariant_names`` the invariants :meth:`invariants` can report, ``evidence`` what each
    checked when it held."""

    name: str
    operations: frozenset[Operation]
    invariant_names: tuple[str, ...]
    evidence: dict[str, str]
    root: Path

    def prepare(self) -> None:
        """Make ``root`` an empty system of this kind (directories, an empty store/repository)."""

    def install(self, added: Sequence[PackageDecl], result: Sequence[PackageDecl]) -> CommandResult:
        """A new generation holding exactly ``result`` (``added`` are the packages new in it)."""

    def remove(self, names: Sequence[str], result: Sequence[PackageDecl]) -> CommandResult:
        """A new generation without the packages ``names``, holding exactly ``result``."""

    def switch(self, number: int) -> CommandResult:
        """Make generation ``number`` the current one."""

    def rollback(self, state: SystemState | None = None) -> CommandResult:
        """Go back to the generation before the current one (``state``: as for :meth:`gc`)."""

    def gc(self, keep: int, state: SystemState | None = None) -> CommandResult:
        """Drop all but the newest ``keep`` generations (and the current one), then collect garbage; the
        generations are ``state``'s when given (a guest's, read in the guest), else read from the root."""

    def verify(self) -> CommandResult:
        """The system's own integrity check (exit 0: it found nothing wrong)."""

    def recover(self) -> CommandResult | None:
        """What the system itself does after a power cut before it is used again, when that is more than its
        next command (None: nothing more — Nix opens its database and SQLite replays or discards its journal;
        OSTree: ``ostree admin cleanup``, which every ``admin deploy`` runs first; the reference: its recovery
        verb)."""

    def corrupt_store(self) -> str:
        """Damage one stored file after the system registered it (a lab fault); returns its root-relative
        path."""

    def state(self) -> SystemState:
        """Read the current state from the root."""

    def cleanup(self) -> None:
        """Undo what keeps the root from being deleted like any directory (OSTree's immutable deployments)."""

    def invariants(self, state: SystemState) -> list[Violation]:
        """The system's structural invariants on ``state`` (its own check included)."""


class RootedSystem:
    """What the real-system adapters share: the root they judge, the lab's work directory (where generations
    are built, on this machine), the runner of their commands, and numbered tree directories."""

    def __init__(self, root: Path, workdir: Path, run: CommandRunner = run_local):
        self.root = root
        self.workdir = workdir
        self.run = run
        self._trees = itertools.count(1)

    def recover(self) -> CommandResult | None:
        """Nothing beyond the next command (see :meth:`SystemUnderTest.recover`)."""
        return None

    def new_tree_dir(self) -> Path:
        """A fresh directory name below ``workdir/trees`` for the next generation's tree."""
        return self.workdir / "trees" / str(next(self._trees))


def require(system: SystemUnderTest, operation: Operation, where: str = "") -> None:
    """Raise :class:`UnsupportedOperation` (one line) when ``system`` lacks ``operation``."""
    if operation not in system.operations:
        has = ", ".join(sorted(system.operations))
        prefix = f"{where}: " if where else ""
        raise UnsupportedOperation(f"{prefix}system {system.name!r} has no {operation.value!r} operation "
                                   f"(it has {has})")


def result_files(decls: Sequence[PackageDecl]) -> tuple[dict[str, str], dict[str, str]]:
    """The union of the packages' files and symlinks (``/usr``-relative path -> content / link target)."""
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    for decl in decls:
        files.update(decl.files)
        links.update(decl.symlinks)
    return files, links


def write_tree(base: Path, decls: Sequence[PackageDecl]) -> Path:
    """Write the union tree of ``decls`` below ``base`` (created); returns ``base``."""
    files, links = result_files(decls)
    base.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    for rel, dest in links.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(dest)
    return base


def run_sequence(run: CommandRunner, argvs: Sequence[Sequence[str]], *,
                 env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argvs`` in order, stopping at the first failure; one result for the whole operation (argv: the
    commands joined by `` && ``, output concatenated, the status of the last command run)."""
    outputs: list[CommandResult] = []
    for argv in argvs:
        outputs.append(run(argv, env=env))
        if not outputs[-1].ok:
            break
    joined = [word for i, r in enumerate(outputs) for word in ((["&&"] if i else []) + list(r.argv))]
    return CommandResult(joined, outputs[-1].returncode, "".join(r.stdout for r in outputs),
                         "".join(r.stderr for r in outputs), sum(r.seconds for r in outputs))
