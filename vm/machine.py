"""A lab guest in the manner of the NixOS test driver: ``start``, ``succeed``, ``fail``, ``wait_for_console``,
``wait_until_succeeds``, ``crash`` (SIGKILL of QEMU: a real power cut), ``reboot``, ``shutdown``.

Use it as a context manager: QEMU, its sockets and its private files are gone afterwards, also on failure and
Ctrl-C; QEMU also gets SIGKILL from the kernel if the controlling process dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pexpect

import vm as _vm_package
from vm.accel import AccelChoice
from vm.console import Console
from vm.errors import CommandFailed, VmError
from vm.host import Kernel, qemu_binary
from vm.initramfs import build_initramfs
from vm.protocol import LineChannel, RunResult
from vm.qemu import DiskSpec, MachineConfig, agent_append, qemu_args
from vm.qmp import QMP
from vm.transport import AgentTransport, ConsoleTransport, SSHTransport, Transport

PROJECT_DIR = Path(_vm_package.__file__).resolve().parents[1]
FAULT_MARKER = "STONELAB-FAULT"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def agent_config(kernel: Kernel, accel: AccelChoice, disks: list[DiskSpec] | None = None, *,
                 memory_mb: int = 1024, cpus: int = 1, python: str | None = None,
                 project: Path = PROJECT_DIR, mode: str = "agent", machine_type: str = "q35") -> MachineConfig:
    """A guest booted directly from ``kernel`` with the lab's initramfs, the host root over 9p and the agent.
    ``python`` (default: the interpreter running the lab, e.g. the project's venv) runs the agent in the guest
    at the same path as on the host."""
    initrd = build_initramfs(kernel, "agent").path
    return MachineConfig(accel=accel, kernel=kernel, initrd=initrd, memory_mb=memory_mb, cpus=cpus,
                         machine_type=machine_type, disks=list(disks or []),
                         append=agent_append(python or sys.executable, str(project), mode))


def foreign_config(image: Path, accel: AccelChoice, append: str = "", *, memory_mb: int = 1024,
                   cpus: int = 1, disks: list[DiskSpec] | None = None, machine_type: str = "q35",
                   initrd: Path | None = None) -> MachineConfig:
    """A kernel that cannot run the lab's userland (e.g. Asterinas): booted directly (Linux boot protocol or
    multiboot — QEMU recognises both; ``initrd`` is the initramfs, or the first multiboot module), watched on the
    console, finished through ``isa-debug-exit``."""
    return MachineConfig(accel=accel, kernel=Kernel(Path(image).resolve(), "", Path("/nonexistent")),
                         initrd=initrd, append=append, memory_mb=memory_mb, cpus=cpus, machine_type=machine_type,
                         disks=list(disks or []), share_host_root=False, agent=False, debug_exit=True)


def uefi_config(accel: AccelChoice, boot_disk: DiskSpec, *, extra_disks: list[DiskSpec] | None = None,
                memory_mb: int = 1024, cpus: int = 1, agent: bool = True,
                share_host_root: bool = True) -> MachineConfig:
    """OVMF → the bootloader on ``boot_disk``'s ESP (systemd-boot) → its default entry. Each Machine runs on its
    private copy of the variable store."""
    from vm.host import ovmf_files
    from vm.qemu import UefiSpec

    code, variables = ovmf_files()
    return MachineConfig(accel=accel, uefi=UefiSpec(code, variables), memory_mb=memory_mb, cpus=cpus,
                         disks=[boot_disk, *(extra_disks or [])], agent=agent, share_host_root=share_host_root)


WORKDIR_PREFIX = "stonelab-vm-"


def sweep_dead_workdirs(tmp: Path | None = None) -> None:
    """Remove the private directories of machines whose controlling process died without cleaning up (SIGKILL:
    QEMU died with it through PR_SET_PDEATHSIG, its sockets and files stayed). The owner's pid is in the name."""
    for directory in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        owner = directory.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(directory, ignore_errors=True)


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image_config(image: Path, accel: AccelChoice, ssh_port: int, *, uefi: bool = True, memory_mb: int = 2048,
                 cpus: int = 2, image_format: str = "qcow2", cache: str = "unsafe") -> MachineConfig:
    """A user's own installed system (e.g. a qcow2 of a real AerynOS install running the real moss), booted by
    its firmware and bootloader, reached over SSH at 127.0.0.1:``ssh_port`` (user networking port forward)."""
    disk = DiskSpec(Path(image).resolve(), cache=cache, format=image_format)
    if not disk.path.is_file():
        raise VmError(f"{image}: guest disk image not found")
    if uefi:
        config = uefi_config(accel, disk, memory_mb=memory_mb, cpus=cpus, agent=False, share_host_root=False)
    else:
        config = MachineConfig(accel=accel, disks=[disk], memory_mb=memory_mb, cpus=cpus, agent=False,
                               share_host_root=False)
    config.ssh_forward_port = ssh_port
    return config


@dataclass
class FaultWatch:
    """Reads ``STONELAB-FAULT <point>`` lines from the guest's ``stonelab`` port; optionally cuts the power the
    moment one arrives (before the host does anything else)."""

    sock: socket.socket
    on_marker: Callable[[str], None]
    points: list[str] = field(default_factory=list)
    _event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, name="stonelab-faults", daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                if text.startswith(FAULT_MARKER):
                    point = text[len(FAULT_MARKER):].strip()
                    self.points.append(point)  # before the power cut: whoever sees the dead guest can tell why
                    self.on_marker(point)
                    self._event.set()

    def wait(self, timeout: float) -> str | None:
        if self._event.wait(timeout):
            return self.points[-1]
        return None


class Machine:
    """One QEMU guest. ``transport`` is "agent" (default) or "console" (a shell on the serial console)."""

    def __init__(self, config: MachineConfig, *, name: str = "guest", boot_timeout: float = 180.0,
                 console_log: Path | None = None, crash_on_fault: bool = False, transport: str = "agent",
                 qemu: str | None = None, ssh: SSHTransport | None = None):
        self.config = config
        self.name = name
        self.boot_timeout = boot_timeout
        self.crash_on_fault = crash_on_fault
        if transport not in ("agent", "console", "ssh") or (transport == "ssh") != (ssh is not None):
            raise VmError(f"{name}: transport must be agent, console, or ssh (with an SSHTransport), not {transport!r}")
        self.transport_kind = transport
        self.ssh = ssh
        self.qemu = qemu or qemu_binary()
        sweep_dead_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{name}-"))
        self.console_log = console_log or self.workdir / "console.log"
        self.uefi_vars: Path | None = None
        if config.uefi:
            self.uefi_vars = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(config.uefi.vars_template, self.uefi_vars)
        self._child: pexpect.spawn | None = None
        self.console: Console | None = None
        self.agent: AgentTransport | None = None
        self.faults: FaultWatch | None = None
        self._sockets: list[socket.socket] = []
        self._qmp: QMP | None = None
        self._reap_lock = threading.RLock()
        self._pidfd: int | None = None
        self.boots: list[dict] = []
        self.exit_status: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.isalive()

    def start(self) -> Machine:
        with self._reap_lock:  # a crash being reaped by the fault watcher must finish before a new boot
            return self._start()

    def _start(self) -> Machine:
        if self.running:
            return self
        if self._child is not None:
            self._reap()  # the previous run died (a power cut): collect it before powering on again
        for stale in ("agent.sock", "fault.sock", "qmp.sock"):
            (self.workdir / stale).unlink(missing_ok=True)
        argv = qemu_args(self.config, self.workdir, self.uefi_vars)
        started = time.monotonic()
        self.exit_status = None
        self._child = pexpect.spawn(self.qemu, argv, echo=False, timeout=None, preexec_fn=_die_with_parent,
                                    dimensions=(24, 200))
        self._pidfd = os.pidfd_open(self._child.pid)
        self.console = Console(self._child, self.console_log)
        try:
            self._wait_for_path(self.workdir / "qmp.sock")  # QEMU has set up its devices
            if self.config.agent:
                agent_sock = self._connect("agent.sock")
                self.faults = FaultWatch(self._connect("fault.sock"), self._on_fault)
                self.agent = AgentTransport(LineChannel(agent_sock.fileno(), agent_sock.fileno()),
                                            self.console.tail)
                if self.transport_kind == "agent":
                    ready = self.agent.wait_ready(self.boot_timeout, lambda: self.running)
                    self.boots.append({"ready_seconds": time.monotonic() - started,
                                       "guest_uptime": ready.get("uptime")})
            if self.ssh is not None:
                self.ssh.close()
                self.ssh.connect(self.boot_timeout)
                self.boots.append({"ready_seconds": time.monotonic() - started})
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_for_path(self, path: Path, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._still_starting(path, deadline, timeout)
            time.sleep(0.02)

    def _still_starting(self, path: Path, deadline: float, timeout: float) -> None:
        """Raise when QEMU died at start-up or did not open ``path`` in time."""
        if not self.running:
            time.sleep(0.2)  # let the console thread collect QEMU's last words
            raise VmError(f"{self.qemu} exited at start-up ({self._child.exitstatus}): "
                          + " | ".join(self.console.tail(10)))
        if time.monotonic() > deadline:
            raise VmError(f"{path}: QEMU did not open its socket within {timeout:g}s")

    def _connect(self, name: str, timeout: float = 15.0) -> socket.socket:
        path = self.workdir / name
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                self._sockets.append(sock)
                return sock
            except OSError:
                sock.close()
                self._still_starting(path, deadline, timeout)
                time.sleep(0.02)

    def _on_fault(self, point: str) -> None:
        if self.crash_on_fault:
            self._power_cut()  # only the signal here; the caller's thread reaps (waitpid is not thread-safe)

    def _power_cut(self) -> None:
        """SIGKILL through a pidfd: never hits a recycled pid, safe from the fault watcher's thread."""
        pidfd = self._pidfd
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def crash(self) -> None:
        """Power cut: SIGKILL of QEMU. Unlike ``quit`` or ``stop`` nothing is flushed; the guest's page cache and
        in-flight requests are lost, exactly what reached the disk image stays."""
        with self._reap_lock:
            self._power_cut()
            self._reap()

    def shutdown(self, timeout: float = 60.0) -> int | None:
        """Clean power-off: the agent syncs, init powers off, QEMU exits. Returns QEMU's exit status."""
        if not self.running:
            self._reap()
            return self.exit_status
        try:
            if self.agent is not None and self.transport_kind == "agent":
                self.agent.request("shutdown", 30)
            elif self.transport_kind == "ssh":
                try:
                    self.ssh.run("sync; poweroff", 30)
                except Exception:  # noqa: BLE001 - the connection drops while the guest powers off
                    pass
            elif self.transport_kind == "console" and self.console:
                self.console.send("exit\n")  # the guest init powers off when the console shell ends
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.running:
                raise VmError(f"{self.name}: the guest did not power off within {timeout:g}s; last console lines: "
                              + " | ".join(self.console.tail()))
        finally:
            self._kill()
        return self.exit_status

    def reboot(self) -> Machine:
        """Clean shutdown, then power on again with the same disks (and UEFI variables)."""
        self.shutdown()
        return self.start()

    def wait_for_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running:
            raise VmError(f"{self.name}: QEMU still running after {timeout:g}s; last console lines: "
                          + " | ".join(self.console.tail()))
        self._reap()
        return self.exit_status

    def _kill(self) -> None:
        with self._reap_lock:
            if self.running:
                try:
                    os.kill(self._child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap()

    def _reap(self) -> None:
        if self.ssh is not None:
            self.ssh.close()
        with self._reap_lock:  # the fault watcher's crash() and the caller may reap at the same time
            self._reap_locked()

    def _reap_locked(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._child is not None:
            try:
                self._child.wait()
            except (pexpect.ExceptionPexpect, ChildProcessError):
                pass  # already reaped by the other thread (a crash from the fault watcher)
            status = self._child.exitstatus
            self.exit_status = status if status is not None else -(self._child.signalstatus or 0)
            self._child.close(force=True)
        if self.console is not None:
            self.console.close()
        self._child = None

    def close(self) -> None:
        self._kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Machine:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self.transport_kind == "console":
            return ConsoleTransport(self.console.send, self.console.wait_for)
        if self.transport_kind == "ssh":
            return self.ssh
        if self.agent is None:
            raise VmError(f"{self.name}: the machine is not running")
        return self.agent

    def execute(self, command: str, timeout: float | None = 600) -> RunResult:
        if not self.running:
            raise VmError(f"{self.name}: the machine is not running (command {command!r})")
        return self.transport.run(command, timeout)

    def succeed(self, command: str, timeout: float | None = 600) -> str:
        """stdout of ``command``; CommandFailed with its exit code and stderr when it fails."""
        result = self.execute(command, timeout)
        if result.exit_code != 0:
            raise CommandFailed(command, result.exit_code, result.stdout, result.stderr)
        return result.stdout

    def fail(self, command: str, timeout: float | None = 600) -> str:
        """stderr of ``command``, which must fail; CommandFailed when it succeeds."""
        result = self.execute(command, timeout)
        if result.exit_code == 0:
            raise CommandFailed(command, 0, result.stdout, "expected a failure, the command succeeded")
        return result.stderr

    def wait_until_succeeds(self, command: str, timeout: float = 60.0, interval: float = 0.5) -> str:
        deadline = time.monotonic() + timeout
        while True:
            result = self.execute(command, max(1.0, deadline - time.monotonic()))
            if result.exit_code == 0:
                return result.stdout
            if time.monotonic() >= deadline:
                raise CommandFailed(command, result.exit_code, result.stdout,
                                    f"still failing after {timeout:g}s: {result.stderr}")
            time.sleep(interval)

    def wait_for_console(self, pattern: str, timeout: float = 60.0):
        return self.console.wait_for(pattern, timeout)

    def wait_for_fault(self, timeout: float = 600.0) -> str | None:
        """The fault point a guest process announced on the ``stonelab`` port, or None after ``timeout``. With
        ``crash_on_fault`` the power was cut when the marker arrived; this returns once QEMU is gone and reaped."""
        point = self.faults.wait(timeout) if self.faults else None
        if point is not None and self.crash_on_fault:
            self.crash()  # already SIGKILLed by the fault watcher: this reaps it in the caller's thread
        return point

    def read_file(self, path: str) -> bytes:
        return self.agent.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
        self.agent.write_file(path, data, mode, fsync)

    def hash_tree(self, path: str) -> dict[str, str]:
        return self.agent.hash_tree(path)

    def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = QMP(self.workdir / "qmp.sock")
        return self._qmp
