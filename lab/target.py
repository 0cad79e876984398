"""Where a scenario runs. The host target: a temporary root on this machine, `stonelab` as a subprocess.

A target runs the reference package manager's CLI against its root, can make a run die at a named fault point,
and observes the root (`lab.probe`). The VM target (vm/) offers the same three things inside a guest, where a
crash is a real power cut.
"""
from __future__ import annotations

import enum
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

from lab.faults import corrupt_largest_asset
from lab.probe import Observation, observe

COMMAND_TIMEOUT = 300


class TargetKind(enum.StrEnum):
    """Where a scenario runs. ``any``: wherever the run puts it (``stonelab run --target``, default host)."""

    ANY = "any"
    HOST = "host"
    VM = "vm"


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    crashed: bool = False  # died at the requested fault point

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        tail = (self.stderr.strip().splitlines() or [""])[-1]
        return f"exit {self.returncode}" + (f": {tail}" if tail else "")


class Target(Protocol):
    """Where a scenario runs: the package manager's CLI against ``root``, observation, injected faults."""

    kind: str
    crash_semantics: str
    root: Path

    def describe(self) -> str: ...
    def stonelab(self, args: list[str], *, fault: str | None = None) -> CommandResult: ...
    def path_for_package(self, path: Path) -> str: ...
    def observe(self) -> Observation: ...
    def corrupt_asset(self) -> str: ...
    def __enter__(self) -> Target: ...
    def __exit__(self, *exc) -> None: ...


class HostTarget:
    kind = TargetKind.HOST
    crash_semantics = ("the process is killed at the fault point (SIGKILL); the kernel's page cache survives, "
                       "so this shows the ordering of steps, not durability — a power cut needs the vm target")

    def __init__(self, workdir: Path | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="stonelab-host-")) if workdir is None else workdir
        self.root = self.workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        # state a stateless transaction must never touch
        (self.root / "etc").mkdir(exist_ok=True)
        (self.root / "etc" / "hostname").write_text("stonelab\n")
        (self.root / "var" / "lib" / "lab").mkdir(parents=True, exist_ok=True)
        (self.root / "var" / "lib" / "lab" / "keep").write_text("user data\n")

    def stonelab(self, args: list[str], *, fault: str | None = None) -> CommandResult:
        argv = [sys.executable, "-m", "stonelab.cli", *args]
        env = dict(os.environ)
        env.pop("STONELAB_FAULT", None)
        if fault:
            env["STONELAB_FAULT"] = f"{fault}:crash"
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        crashed = bool(fault) and proc.returncode == -signal.SIGKILL
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, crashed)

    def describe(self) -> str:
        return f"host process on kernel {os.uname().release}, root {self.root}"

    def path_for_package(self, path: Path) -> str:
        return str(path)

    def observe(self) -> Observation:
        return observe(self.root)

    def corrupt_asset(self) -> str:
        return corrupt_largest_asset(self.root)

    def close(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "HostTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
