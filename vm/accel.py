"""Accelerator choice: KVM only when a guest really makes progress under it, else TCG — with the reason.

Opening /dev/kvm proves nothing (on nested hosts without vmx/svm guests hang right after the decompressor), so
the probe boots the kernel with the bare initramfs under KVM and waits a few seconds for its marker.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vm.errors import VmError
from vm.host import Kernel, qemu_binary
from vm.initramfs import BARE_MARKER, build_initramfs

ACCELS = ("auto", "kvm", "tcg")
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    """What the lab runs guests with, and why (reports use it as is)."""

    accel: str            # "kvm" or "tcg"
    reason: str
    requested: str = "auto"
    probe_seconds: float | None = None

    def describe(self) -> str:
        return f"accelerator {self.accel} ({self.reason})"


@dataclass(frozen=True)
class ProbeResult:
    works: bool
    reason: str
    seconds: float


def probe_kvm(kernel: Kernel, timeout: float = 6.0, qemu: str | None = None,
              kvm_device: Path = KVM_DEVICE) -> ProbeResult:
    """Boot ``kernel`` with the bare initramfs under KVM and wait ``timeout`` s for the bare init's marker."""
    started = time.monotonic()
    if not kvm_device.exists():
        return ProbeResult(False, f"{kvm_device} does not exist", 0.0)
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return ProbeResult(False, f"{kvm_device} is not readable and writable by this user", 0.0)
    initrd = build_initramfs(kernel, "bare").path
    args = [qemu or qemu_binary(), "-accel", "kvm", "-cpu", "host", "-M", "q35", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel.image), "-initrd",
            str(initrd), "-append", "console=ttyS0 quiet panic=-1 no_timer_check"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen = b""
    try:
        deadline = started + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if BARE_MARKER.encode() in seen:
                return ProbeResult(True, f"a probe guest reached its init under KVM in "
                                         f"{time.monotonic() - started:.1f}s", time.monotonic() - started)
        tail = seen.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no console output"]
        if time.monotonic() < deadline:  # end of output before the deadline: QEMU is exiting
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is not None:
            return ProbeResult(False, f"{kvm_device} opens but the probe guest exited ({proc.returncode}) "
                                      f"without reaching init: {tail[0][:120]}", time.monotonic() - started)
        return ProbeResult(False, f"{kvm_device} opens but a probe guest made no progress within {timeout:g}s "
                                  f"(last console line: {tail[0][:120]})", time.monotonic() - started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


@dataclass
class AccelSelector:
    """Chooses the accelerator; remembers probe results per kernel and host for its own lifetime only."""

    probe: Callable[[Kernel, float], ProbeResult] = field(default=lambda kernel, timeout: probe_kvm(kernel, timeout))
    probe_timeout: float = 6.0
    _cache: dict[tuple, ProbeResult] = field(default_factory=dict)

    def choose(self, kernel: Kernel, requested: str = "auto") -> AccelChoice:
        if requested not in ACCELS:
            raise VmError(f"--accel {requested}: unknown accelerator (valid: {', '.join(ACCELS)})")
        if requested == "tcg":
            return AccelChoice("tcg", "forced with --accel tcg", requested)
        if requested == "kvm":
            if not KVM_DEVICE.exists():
                raise VmError(f"--accel kvm: {KVM_DEVICE} does not exist on this host (use --accel tcg or auto)")
            return AccelChoice("kvm", "forced with --accel kvm (not probed)", requested)
        st = kernel.image.stat()
        key = (str(kernel.image), st.st_size, st.st_mtime_ns, socket.gethostname(), os.uname().release)
        if key not in self._cache:
            self._cache[key] = self.probe(kernel, self.probe_timeout)
        result = self._cache[key]
        if result.works:
            return AccelChoice("kvm", result.reason, requested, result.seconds)
        return AccelChoice("tcg", f"KVM unusable: {result.reason}; falling back to TCG", requested,
                           result.seconds)
