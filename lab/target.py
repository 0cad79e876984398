"""Where a scenario runs. The host target: a temporary root on this machine, `stonelab` as a subprocess.

A target runs the reference package manager's CLI against its root, can make a run die at a named fault point,
and observes the root (`lab.probe`). The VM target (vm/) offers the same three things inside a guest, where a
crash is a real power cut.
"""
from __future__ import annotations

import enum
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from pathlib import Path

from lab.bootprobe import observe_boot
from lab.faults import ACTIONS as FAULT_ACTIONS
from lab.probe import Observation, observe
from stonelab.errors import StonelabError

if TYPE_CHECKING:
    from lab.crash.model import Model

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
    lost: str = ""  # after a power cut: what the disk lost (the power-loss model's account)
    timed_out: bool = False  # killed by the lab after COMMAND_TIMEOUT (returncode -9): not the program's own exit

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        tail = (self.stderr.strip().splitlines() or [""])[-1]
        if self.timed_out:
            return f"timed out: killed after {self.seconds:.0f} s" + (f" (last output: {tail})" if tail else "")
        return f"exit {self.returncode}" + (f": {tail}" if tail else "")


class Target(Protocol):
    """Where a scenario runs: the package manager's CLI against ``root``, observation, injected faults."""

    kind: str
    crash_semantics: str
    root: Path

    def describe(self) -> str: ...
    def cut_semantics(self, model: Model) -> str: ...
    def stonelab(self, args: list[str], *, fault: str | None = None, env: dict[str, str] | None = None,
                 trace: Path | None = None, cut_model: Model | None = None) -> CommandResult: ...
    def path_for_package(self, path: Path) -> str: ...
    def observe(self, *, boot: bool = False) -> Observation: ...
    def corrupt_asset(self) -> str: ...
    def inject(self, action: str, arg: str = "") -> str: ...
    def boot_args(self) -> list[str]: ...
    def shell(self, command: str) -> CommandResult: ...
    def reboot(self) -> str: ...
    def count_mutations(self, args: list[str]) -> int: ...
    def __enter__(self) -> Target: ...
    def __exit__(self, *exc) -> None: ...


STRACE_CALLS = "rename,renameat,renameat2,link,linkat,symlink,symlinkat,open,openat,creat,write,pwrite64," \
    "fsync,fdatasync,syncfs,sync,sync_file_range,unlink,unlinkat,mkdir,mkdirat"


def strace_argv(out: Path) -> list[str]:
    """strace recording the calls the ALICE check reasons about, with file descriptors shown as paths."""
    return ["strace", "-f", "-qq", "-y", "-s", "0", "-o", str(out), "-e", f"trace={STRACE_CALLS}"]


class HostTarget:
    kind = TargetKind.HOST
    crash_semantics = ("the process is killed at the fault point (SIGKILL); the kernel's page cache survives, "
                       "so this shows the ordering of steps, not durability — a power cut needs the vm target")

    def cut_semantics(self, model: Model) -> str:
        """A killed process loses no disk cache: the same whatever the power-loss model."""
        return self.crash_semantics

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

        self._disk: Path | None = None
        self.nofile: int | None = None  # RLIMIT_NOFILE (soft = hard) of the package manager: limit_open_files

    def stonelab(self, args: list[str], *, fault: str | None = None, env: dict[str, str] | None = None,
                 trace: Path | None = None, cut_model: Model | None = None) -> CommandResult:
        """The package manager's CLI; ``fault`` kills it at that point, ``env`` adds variables (a seeded cut),
        ``trace`` records its system calls there (strace, for the ALICE check).  ``cut_model`` is ignored: a
        killed process loses no disk cache."""
        argv = [sys.executable, "-m", "stonelab.cli", *args]
        if trace is not None:
            argv = [*strace_argv(trace), *argv]
        environ = dict(os.environ)
        environ.pop("STONELAB_FAULT", None)
        environ.update(env or {})
        if fault:
            environ["STONELAB_FAULT"] = f"{fault}:crash"
        started = time.monotonic()
        limit = None if self.nofile is None else \
            (lambda n=self.nofile: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
        proc = subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, preexec_fn=limit)
        crashed = proc.returncode == -signal.SIGKILL or (trace is not None and proc.returncode == 128 + 9)
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, crashed)

    @property
    def disk(self) -> Path:
        """A GPT system disk image (ESP + an ext4 partition whose PARTUUID entries name), made on first use."""
        if self._disk is None:
            from vm.disk import DiskLayout, build_disk
            self._disk = build_disk(self.workdir / "disk.img", DiskLayout(esp_mib=40, root_mib=16)).path
        return self._disk

    def boot_args(self) -> list[str]:
        return ["--esp", str(self.disk), "--root-device", f"{self.disk}:2"]

    def inject(self, action: str, arg: str = "") -> str:
        needs_disk = action in ("delete-esp", "wipe-esp", "fill-esp")
        if action == "fill-root":
            raise StonelabError("fill: root needs the vm target (the host target's root is a directory on the "
                                "lab's own filesystem, which the lab will not fill)")
        return FAULT_ACTIONS[action](self.root, self.disk if needs_disk else None, arg)

    def shell(self, command: str) -> CommandResult:
        started = time.monotonic()
        proc = subprocess.run(["sh", "-c", command], cwd=self.root, capture_output=True, text=True,
                              env={**os.environ, "STONELAB_ROOT": str(self.root)}, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        return CommandResult(["sh", "-c", command], proc.returncode, proc.stdout, proc.stderr,
                             time.monotonic() - started)

    def count_mutations(self, args: list[str]) -> int:
        """How many filesystem-changing calls ``stonelab ARGS`` makes, run on a copy of the root (and disk)."""
        scratch = Path(tempfile.mkdtemp(prefix="calibrate-", dir=self.workdir))
        try:
            subprocess.run(["cp", "-a", str(self.root), str(scratch / "root")], check=True)
            swap = {str(self.root): str(scratch / "root")}
            if self._disk is not None:
                shutil.copy2(self._disk, scratch / "disk.img")
                swap[str(self._disk)] = str(scratch / "disk.img")
                swap[f"{self._disk}:2"] = f"{scratch / 'disk.img'}:2"
            counted = scratch / "count"
            self.stonelab([swap.get(a, a) for a in args], env={"STONELAB_CUT": f"count:{counted}"})
            return int(counted.read_text() or 0) if counted.exists() else 0
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def boot_entry(self, entry: str) -> tuple[str, str, str]:
        raise StonelabError("boot: a real UEFI boot needs the vm target (target: vm, or stonelab run --target vm)")

    def reboot(self) -> str:
        return "host target: nothing to restart (each verb is a new process; the page cache stays)"

    def describe(self) -> str:
        return f"host process on kernel {os.uname().release}, root {self.root}"

    def path_for_package(self, path: Path) -> str:
        return str(path)

    def observe(self, *, boot: bool = False) -> Observation:
        obs = observe(self.root)
        if boot:
            obs.boot = observe_boot(self.disk)
        return obs

    def corrupt_asset(self) -> str:
        return self.inject("corrupt-asset")

    def close(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "HostTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
