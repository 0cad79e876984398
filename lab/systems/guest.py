"""Running a system's commands inside a lab guest (the VM target), where its root is a real disk.

:class:`GuestRunner` is a :class:`~lab.systems.base.CommandRunner` over a running :class:`vm.machine.Machine`:
the same argv and environment, executed by the guest agent. The guest sees this machine's root read-only over
9p (the binaries, the project, the lab's work directory with the source store and binary cache) and has tmpfs on
``/tmp``, so a system's scratch directory (Nix's HOME) goes there.
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.target import COMMAND_TIMEOUT, CommandResult

GUEST_SCRATCH = Path("/tmp/stonelab-sut-scratch")


class GuestRunner:
    """Runs argv in the guest of ``machine`` (anything with ``execute(command, timeout)``)."""

    def __init__(self, machine, timeout: float = COMMAND_TIMEOUT):
        self.machine = machine
        self.timeout = timeout

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> CommandResult:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        command = (f"cd {shlex.quote(str(cwd))} && " if cwd else "") + \
            (f"env {prefix} " if prefix else "") + shlex.join(list(argv))
        started = time.monotonic()
        result = self.machine.execute(command, self.timeout)
        return CommandResult(list(argv), result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started)
