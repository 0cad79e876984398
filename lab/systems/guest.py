"""Real systems in a lab guest: their root on a virtio disk (ext4 with a journal, or ext2 without one — the
Asterinas 0.18.1 setup), their commands run by the guest agent, and a power cut the moment an operation returns.

- :class:`GuestRunner` is a :class:`~lab.systems.base.CommandRunner` over a running machine: the same argv and
  environment, executed in the guest. The guest sees this machine's root read-only over 9p (the binaries, the
  project, the lab's work directory with the source store, binary cache and repository) and has tmpfs on
  ``/tmp``, where a system's scratch directory (Nix's HOME) goes.
- :class:`SystemGuest` is the VM target with the root file system of choice, its writes recorded for the crash
  engine. As in :mod:`lab.vm_target`, periodic writeback is off in the guest (and ext4's periodic journal
  commit): what survives a power cut is exactly what the system flushed. That is also Asterinas 0.18.1's
  behaviour, which has no writeback thread and whose only persistent root file system is ext2
  (``../shared/docs/asterinas-0.18.1.md``, "Durability").
- :class:`GuestSystem` wraps an adapter whose commands run in the guest: its state and invariants are read in the
  guest too (``python -m lab.systems.crashcheck``).
"""
from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.invariants import Violation
from lab.systems import make_system
from lab.systems.base import Generation, RootFilesystem, SystemState, SystemUnderTest
from lab.target import COMMAND_TIMEOUT, CommandResult
from lab.vm_target import GUEST_ROOT, VmTarget
from stonelab.errors import StonelabError

GUEST_SCRATCH = Path("/tmp/stonelab-sut-scratch")


class GuestRunner:
    """Runs argv in the guest of ``machine`` (a :class:`vm.machine.Machine`: its ``execute`` adds the environment
    and sets the working directory)."""

    def __init__(self, machine, timeout: float = COMMAND_TIMEOUT):
        self.machine = machine
        self.timeout = timeout

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> CommandResult:
        started = time.monotonic()
        result = self.machine.execute(list(argv), self.timeout, env=dict(env or {}),
                                      cwd=str(cwd) if cwd else None)
        return CommandResult(list(argv), result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started)


class SystemGuest(VmTarget):
    """The VM target with the SUT root on ``filesystem``; with ``record`` (a scenario that explores crash
    states) each boot's disk writes are logged for the crash engine (:mod:`lab.crash`)."""

    crash_semantics = ("volatile-cache power-loss model: every crash state of each power_loss step's operation "
                       "checked (docs/CRASH.md); periodic writeback off, so what survives is what the system "
                       "flushed")

    def __init__(self, workdir: Path, filesystem: RootFilesystem = RootFilesystem.EXT4, *, record: bool = True,
                 **kwargs):
        self.filesystem = RootFilesystem(filesystem)
        # Nix and OSTree are the host's binaries: the guest runs them from the host root over 9p
        super().__init__(workdir, root_fs=str(self.filesystem), record=record, host_userland=True, **kwargs)

    def describe(self) -> str:
        return f"{super().describe()}, SUT root {self.filesystem} (writeback off)"

    def settle(self) -> None:
        """Everything written so far durable: ``sync``, then an fsync of the root directory, which on ext2 is
        what sends the disk a cache FLUSH (``sync(2)`` writes ext2's blocks out but flushes nothing)."""
        self.power_on()
        self.machine.succeed(f"sync && sync {GUEST_ROOT}")


class GuestSystem:
    """``inner`` (an adapter whose runner is a :class:`GuestRunner` on ``guest``) with its state and
    invariants read in the guest."""

    def __init__(self, inner: SystemUnderTest, guest: SystemGuest, scratch: Path):
        self.inner = inner
        self.guest = guest
        self.scratch = scratch
        self.name = inner.name
        self.operations = inner.operations
        self.invariant_names = inner.invariant_names
        self.evidence = inner.evidence
        self.root = inner.root
        self._violations: list[Violation] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the operations: their commands already run in the guest

    def prepare(self) -> None:
        self.guest.machine.succeed(f"mkdir -p {shlex.quote(str(self.root))}")
        self.inner.prepare()

    def observe(self) -> dict:
        """:func:`lab.systems.crashcheck.observe_system` run in the guest (powered on if it was cut)."""
        self.guest.power_on()
        result = self.guest._python(["-m", "lab.systems.crashcheck", self.name, str(self.root),
                                     str(self.scratch)])
        if result.exit_code != 0:
            raise StonelabError(f"reading {self.name}'s state in the guest failed: {result.stderr.strip()[-300:]}")
        return json.loads(result.stdout)

    def state(self) -> SystemState:
        data = self.observe()
        self._violations = [Violation(**v) for v in data["violations"]]
        return SystemState([Generation(n, ref) for n, ref in data["generations"]], data["current"], data["tree"])

    def invariants(self, state: SystemState) -> list[Violation]:
        return list(self._violations)  # read with the state, in the same guest command

    def gc(self, keep: int) -> CommandResult:
        """The inner adapter's gc over the generations read in the guest: the root exists only there, so the
        adapter's own reading would find none and delete nothing."""
        return self.inner.gc(keep, state=self.state())

    def rollback(self) -> CommandResult:
        """The inner adapter's rollback over the generations read in the guest (see :meth:`gc`)."""
        return self.inner.rollback(state=self.state())

    def corrupt_store(self) -> str:
        raise StonelabError(f"corrupt_store runs on the host target only (system {self.name!r})")

    def cleanup(self) -> None:
        """Nothing: the disk goes with the guest."""


def guest_system(name: str, guest: SystemGuest, workdir: Path, root: Path | None = None) -> GuestSystem:
    """System ``name`` in ``guest``, rooted at ``root`` on the SUT disk (default ``GUEST_ROOT/name``; several
    systems or scenarios can share one guest, each on a root of its own); ``workdir`` on this machine holds what
    the lab builds for it (readable in the guest over 9p)."""
    scratch = GUEST_SCRATCH / name
    inner = make_system(name, root or Path(GUEST_ROOT) / name, workdir, run=GuestRunner(guest.machine),
                        scratch=scratch)
    return GuestSystem(inner, guest, scratch)
