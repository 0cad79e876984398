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
from typing import Any
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import pexpect

import vm as _vm_package
from vm.accel import AccelChoice
from vm.console import Console
from vm.errors import CommandFailed, VmError
from vm.host import Kernel, qemu_binary
from vm.initramfs import build_initramfs
from vm.log import get_logger, nested
from vm.qemu import DiskSpec, MachineConfig, agent_append, qemu_args
from vm.qmp import QMP
from vm.transport import (AgentTransport, Command, ConsoleTransport, GuestLink, RunResult, Transport,
                          shell_line)

log = get_logger("vm.machine")

PROJECT_DIR = Path(_vm_package.__file__).resolve().parents[1]
FAULT_MARKER = "STONELAB-FAULT"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def agent_config(kernel: Kernel, accel: AccelChoice, disks: list[DiskSpec] | None = None, *,
                 memory_mb: int = 1024, cpus: int = 1, python: str | None = None,
                 project: Path = PROJECT_DIR, mode: str = "agent", machine_type: str = "q35",
                 userland: str = "image") -> MachineConfig:
    """A guest booted directly from ``kernel`` with the lab's initramfs and the agent. ``python`` (default: the
    interpreter running the lab, e.g. the project's venv) runs the agent at the same path as on the host.

    ``userland="image"`` (default): the read-only EROFS image of ``vm.userland`` (interpreter, venv, project,
    shell tools) as the last virtio disk, after ``disks`` (so they stay ``/dev/vda``, ``/dev/vdb``, …); such a
    guest can be saved and restored. ``"9p"``: the whole host root over 9p (any host program, no snapshots)."""
    from vm.initramfs import module_files
    from vm.userland import GUEST_ON_DEMAND_MODULES, UserlandSpec, build_userland

    if userland not in ("image", "9p"):
        raise VmError(f"unknown guest userland {userland!r} (valid: image, 9p)")
    initrd = build_initramfs(kernel, "agent").path
    disks = list(disks or [])
    extra = ""
    if userland == "image":
        modules = tuple(path.resolve() for path in module_files(kernel, GUEST_ON_DEMAND_MODULES))
        image = build_userland(UserlandSpec(python=Path(python or sys.executable), project=project,
                                            kernel_modules=modules))
        extra = f"stonelab.userland=vd{chr(ord('a') + len(disks))}"
        disks.append(DiskSpec(image.path, cache="unsafe", readonly=True))
    return MachineConfig(accel=accel, kernel=kernel, initrd=initrd, memory_mb=memory_mb, cpus=cpus,
                         machine_type=machine_type, disks=disks, share_host_root=userland == "9p",
                         append=agent_append(python or sys.executable, str(project), mode, extra))


def foreign_config(image: Path, accel: AccelChoice, append: str = "", *, memory_mb: int = 1024,
                   cpus: int = 1, disks: list[DiskSpec] | None = None, machine_type: str = "q35",
                   initrd: Path | None = None, modules: tuple[str, ...] = ()) -> MachineConfig:
    """A kernel that cannot run the lab's userland (e.g. Asterinas): booted directly (Linux boot protocol or
    multiboot — QEMU recognises both; ``initrd`` is the initramfs, or the first multiboot module), watched on the
    console, finished through ``isa-debug-exit``.  ``modules`` ("PATH[ ARGS]" each): a multiboot kernel's
    modules in order, instead of ``initrd`` (e.g. Xen: dom0's kernel, then its initramfs)."""
    return MachineConfig(accel=accel, kernel=Kernel(Path(image).resolve(), "", Path("/nonexistent")),
                         initrd=initrd, append=append, memory_mb=memory_mb, cpus=cpus, machine_type=machine_type,
                         disks=list(disks or []), share_host_root=False, agent=False, debug_exit=True,
                         multiboot_modules=tuple(modules))


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
# sun_path is 108 bytes with its terminating NUL (unix(7)); the longest socket name a machine creates is this one.
UNIX_PATH_MAX = 107
LONGEST_SOCKET = "agent.sock"


def workdir_base(prefix_length: int) -> Path:
    """The directory a machine's private workdir goes in: the temporary directory (``TMPDIR``) when its unix
    sockets fit in ``sun_path`` there, else ``/tmp`` (a deep ``TMPDIR`` such as a test's work directory would
    make QEMU refuse ``-qmp unix:…`` with "Path must be less than 108 bytes")."""
    random_suffix = 8  # what mkdtemp appends
    for base in (Path(tempfile.gettempdir()), Path("/tmp")):
        if len(str(base)) + 1 + prefix_length + random_suffix + 1 + len(LONGEST_SOCKET) <= UNIX_PATH_MAX:
            return base
    return Path("/tmp")


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


class QemuProcess:
    """One QEMU process under a pty: spawned on ``__enter__`` (dies with its parent: PR_SET_PDEATHSIG), its console
    drained by a thread; ``__exit__`` SIGKILLs it if it still runs, reaps it, closes its pidfd and the console."""

    def __init__(self, qemu: str, argv: list[str], console_log: Path):
        self.qemu, self.argv, self.console_log = qemu, argv, console_log
        self.exit_status: int | None = None
        self._lock = threading.RLock()  # the fault watcher signals while the caller may be reaping

    def __enter__(self) -> QemuProcess:
        log.debug("qemu argv: %s", shell_line([self.qemu, *self.argv]))
        self.child = pexpect.spawn(self.qemu, self.argv, echo=False, timeout=None, preexec_fn=_die_with_parent,
                                   dimensions=(24, 200))
        self.pidfd: int | None = os.pidfd_open(self.child.pid)
        self.console = Console(self.child, self.console_log)
        return self

    @property
    def alive(self) -> bool:
        return self.child.isalive()

    def power_cut(self) -> None:
        """SIGKILL through the pidfd: never hits a recycled pid, safe from another thread."""
        with self._lock:
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __exit__(self, *exc) -> None:
        self.power_cut()
        with self._lock:
            try:
                self.child.wait()
            except (pexpect.ExceptionPexpect, ChildProcessError):
                pass  # already reaped
            status = self.child.exitstatus
            self.exit_status = status if status is not None else -(self.child.signalstatus or 0)
            self.child.close(force=True)
            os.close(self.pidfd)
            self.pidfd = None
        self.console.close()


class Machine:
    """One QEMU guest, reached through one ``Transport`` (default: the agent when the config has one, else the
    console shell). Every boot owns its resources — QEMU, its sockets, QMP, the transport's connection — through
    one ``ExitStack``; a power cut or a shutdown closes that stack, ``close()`` also removes the private directory.
    ``restore_from``: a saved VM state (``vm.snapshot``) to resume instead of booting."""

    def __init__(self, config: MachineConfig, *, name: str = "guest", boot_timeout: float = 180.0,
                 console_log: Path | None = None, crash_on_fault: bool = False,
                 transport: Transport | None = None, qemu: str | None = None, restore_from: Path | None = None):
        self.config = config
        self.name = name
        self.boot_timeout = boot_timeout
        self.crash_on_fault = crash_on_fault
        self.transport: Transport = transport or (AgentTransport() if config.agent else ConsoleTransport())
        self.qemu = qemu or qemu_binary()
        self.restore_from = restore_from
        prefix = f"{WORKDIR_PREFIX}{os.getpid()}-{name}-"
        base = workdir_base(len(prefix))
        sweep_dead_workdirs(base)
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.console_log = console_log or self.workdir / "console.log"
        self.uefi_vars: Path | None = None
        if config.uefi:
            self.uefi_vars = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(config.uefi.vars_template, self.uefi_vars)
        self._boot: ExitStack | None = None
        self._process: QemuProcess | None = None
        self.faults: FaultWatch | None = None
        self._qmp: QMP | None = None
        self._lock = threading.RLock()
        self.boots: list[dict] = []
        self.on_fault: Callable[[str], None] | None = None  # called on a fault marker, before a power cut

    @property
    def exit_status(self) -> int | None:
        """QEMU's exit status of the last boot (negative: killed by that signal); None while it runs."""
        return self._process.exit_status if self._process is not None else None

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.child.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def console(self) -> Console | None:
        return self._process.console if self._process is not None else None

    @property
    def agent(self) -> AgentTransport:
        """The agent transport (files, tree hashes); VmError when this machine is reached another way."""
        if not isinstance(self.transport, AgentTransport):
            raise VmError(f"{self.name}: this operation needs the guest agent, the machine uses "
                          f"{type(self.transport).__name__}")
        return self.transport

    def start(self) -> Machine:
        with self._lock:  # a crash being reaped by the fault watcher must finish before a new boot
            if self.running:
                return self
            self._end_boot()  # the previous run died (a power cut): collect it before powering on again
            with ExitStack() as boot:
                self._boot_into(boot)
                self._boot = boot.pop_all()
        return self

    def _boot_into(self, boot: ExitStack) -> None:
        for stale in ("agent.sock", "fault.sock", "qmp.sock"):
            (self.workdir / stale).unlink(missing_ok=True)
        argv = qemu_args(self.config, self.workdir, self.uefi_vars)
        restoring = self.restore_from is not None
        if restoring:
            argv += ["-incoming", f"exec:cat {shell_line([str(self.restore_from)])}"]
        started = time.monotonic()
        action = f"restoring {self.name} from {self.restore_from.name}" if restoring else f"booting {self.name}"
        with nested(log, action):
            self._process = boot.enter_context(QemuProcess(self.qemu, argv, self.console_log))
            self._wait_for_path(self.workdir / "qmp.sock")  # QEMU has set up its devices
            boot.callback(self._close_qmp)
            if self.config.agent:
                self.faults = FaultWatch(boot.enter_context(closing(self._connect("fault.sock"))), self._on_fault)
            if restoring:
                self._wait_until_running()
            link = GuestLink(self._connect, self._process.console, lambda: self.running, restored=restoring)
            boot.callback(self.transport.detach)
            ready = self.transport.attach(link, self.boot_timeout)
            self.boots.append({"ready_seconds": time.monotonic() - started, "restored": restoring,
                               "guest_uptime": ready.get("uptime")})

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def _wait_until_running(self) -> None:
        """A restored guest runs once QEMU has loaded the whole saved state (input sent earlier would be lost)."""
        deadline = time.monotonic() + self.boot_timeout
        while (status := self.qmp().status()) != "running":
            if status not in ("inmigrate", "prelaunch", "paused") or time.monotonic() > deadline:
                raise VmError(f"{self.name}: restoring {self.restore_from} failed (QEMU status {status!r}); "
                              "console: " + " | ".join(self.console.tail(10)))
            time.sleep(0.02)

    def _wait_for_path(self, path: Path, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._still_starting(path, deadline, timeout)
            time.sleep(0.02)

    def _still_starting(self, path: Path, deadline: float, timeout: float) -> None:
        """Raise when QEMU died at start-up or did not open ``path`` in time."""
        if not self.running:
            time.sleep(0.2)  # let the console thread collect QEMU's last words
            raise VmError(f"{self.qemu} exited at start-up ({self._process.child.exitstatus}): "
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
                return sock
            except OSError:
                sock.close()
                self._still_starting(path, deadline, timeout)
                time.sleep(0.02)

    def _on_fault(self, point: str) -> None:
        if self.on_fault is not None:
            self.on_fault(point)
        if self.crash_on_fault and self._process is not None:
            self._process.power_cut()  # only the signal here; the caller's thread reaps (waitpid is not thread-safe)

    def _end_boot(self) -> None:
        """Close this boot's stack: transport, QMP, sockets, then QEMU (SIGKILL if still running, reaped)."""
        with self._lock:
            boot, self._boot = self._boot, None
            if boot is not None:
                boot.close()

    def crash(self) -> None:
        """Power cut: SIGKILL of QEMU. Unlike ``quit`` or ``stop`` nothing is flushed; the guest's page cache and
        in-flight requests are lost, exactly what reached the disk image stays."""
        with self._lock:
            if self._process is not None:
                self._process.power_cut()
            self._end_boot()

    def shutdown(self, timeout: float = 60.0) -> int | None:
        """Clean power-off: the guest syncs and powers off, QEMU exits. Returns QEMU's exit status."""
        if not self.running:
            self._end_boot()
            return self.exit_status
        try:
            with nested(log, f"powering off {self.name}"):
                self.transport.request_poweroff()
                deadline = time.monotonic() + timeout
                while self.running and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.running:
                    raise VmError(f"{self.name}: the guest did not power off within {timeout:g}s; last console "
                                  "lines: " + " | ".join(self.console.tail()))
        finally:
            self._end_boot()
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
        self._end_boot()
        return self.exit_status

    def close(self) -> None:
        self._end_boot()
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
    def execute(self, command: Command, timeout: float | None = 600, *, env: dict[str, str] | None = None,
                cwd: str | None = None, warm: bool = False) -> RunResult:
        """Run ``command`` (a word list, run exactly; or a shell command line) in the guest, with ``env`` added to
        its environment, in ``cwd``; ``warm``: a ``python -m``/``-c`` word list the guest may fork from a warm
        interpreter (``vm.zygote``) instead of starting a fresh one, with the same result."""
        if not self.running:
            raise VmError(f"{self.name}: the machine is not running (command {shell_line(command)!r})")
        log.debug("%s$ %s%s", self.name, shell_line(command, env, cwd), " (warm)" if warm else "")
        result = self.transport.run(command, timeout, env=env, cwd=cwd, warm=warm)
        log.debug("%s: exit %d after %.2f s", self.name, result.exit_code, result.seconds)
        return result

    def succeed(self, command: Command, timeout: float | None = 600, **how: Any) -> str:
        """stdout of ``command`` (``how``: ``execute``'s env, cwd, warm); CommandFailed with its exit code and
        stderr when it fails."""
        result = self.execute(command, timeout, **how)
        if result.exit_code != 0:
            raise CommandFailed(shell_line(command), result.exit_code, result.stdout, result.stderr)
        return result.stdout

    def fail(self, command: Command, timeout: float | None = 600) -> str:
        """stderr of ``command``, which must fail; CommandFailed when it succeeds."""
        result = self.execute(command, timeout)
        if result.exit_code == 0:
            raise CommandFailed(shell_line(command), 0, result.stdout, "expected a failure, the command succeeded")
        return result.stderr

    def wait_until_succeeds(self, command: Command, timeout: float = 60.0, interval: float = 0.5) -> str:
        deadline = time.monotonic() + timeout
        while True:
            result = self.execute(command, max(1.0, deadline - time.monotonic()))
            if result.exit_code == 0:
                return result.stdout
            if time.monotonic() >= deadline:
                raise CommandFailed(shell_line(command), result.exit_code, result.stdout,
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
        return self.transport.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
        self.transport.write_file(path, data, mode, fsync)

    def hash_tree(self, path: str) -> dict[str, str]:
        return self.agent.hash_tree(path)

    def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = QMP(self.workdir / "qmp.sock")
        return self._qmp
