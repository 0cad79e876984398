"""Errors of the VM layer: all are one-line StonelabErrors (the CLI prints them, exit status 2)."""
from __future__ import annotations

from stonelab.errors import StonelabError


class VmError(StonelabError):
    """Something about the guest or the host's virtualisation tools is unusable."""


class MissingHostTool(VmError):
    """A host program or file is absent; the message names the Debian package that provides it."""


class GuestTimeout(VmError):
    """The guest stopped answering. ``console_tail`` holds its last console lines."""

    def __init__(self, what: str, seconds: float, console_tail: list[str]):
        self.console_tail = console_tail
        tail = " | ".join(line.strip() for line in console_tail if line.strip())
        super().__init__(f"guest timed out after {seconds:.0f}s waiting for {what}; "
                         f"last {len(console_tail)} console lines: {tail or '(none)'}")


class CommandFailed(VmError):
    """A guest command expected to succeed exited non-zero (or one expected to fail succeeded)."""

    def __init__(self, command: str, exit_code: int, stdout: str, stderr: str):
        self.command, self.exit_code, self.stdout, self.stderr = command, exit_code, stdout, stderr
        err = stderr.strip().replace("\n", " | ")[-2000:]
        super().__init__(f"guest command {command!r} exited {exit_code}: {err or '(no stderr)'}")
