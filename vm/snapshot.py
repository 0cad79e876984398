"""Saved guests: boot an agent guest once, save it right after boot, restore it for every scenario or crash state.

A guest on the EROFS userland (``vm.userland``) holds no host state QEMU cannot migrate (a 9p export it can), so
it is saved with QMP ``migrate`` to ``exec:cat > FILE`` and restored with ``-incoming exec:cat FILE``
(https://www.qemu.org/docs/master/devel/migration/main.html). The saved state is keyed by everything that shapes
the guest: QEMU binary, kernel, initrd, command line, memory, CPUs, machine type, and the disks — the userland
image (``stonelab.userland=vdX``, mounted by the saved guest) by path, size and mtime (it is itself keyed by its
inputs), every other disk only by what the guest sees of it: its virtual size, read-only flag and write cache.
The state is saved with blank placeholder disks in their place, the guest never mounted them, and ``resume``
makes the restored guest drop its cached blocks and re-read the partition tables of the disks it now has (the
scenario's own: a raw image, or a recording target's qcow2 overlay behind a write log and its read-only base),
then sets its clock. What a restored guest sees on its disks is exactly what a freshly booted one would.

States live under ``$XDG_CACHE_HOME/stonelab/snapshots/`` (one per key, written to a temporary and renamed, a
lock file against concurrent savers).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

from vm.errors import VmError
from vm.initramfs import cache_dir
from vm.log import get_logger, nested
from vm.qemu import BLOCKDEV_CACHE, DiskSpec, MachineConfig

FORMAT_VERSION = "2"
# what the lab's guest commands import (the verbs import the client only when they open an installation): read once
# before the save, they are in the restored guest's page cache
log = get_logger("vm.snapshot")


def _stat(path: Path | None) -> str:
    if path is None:
        return "-"
    st = Path(path).stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def virtual_size(disk: DiskSpec) -> int:
    """The size in bytes the guest sees of ``disk``: a raw file's length, or a qcow2 image's ``size`` header field
    (bytes 24–31, big-endian: https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt).
    VmError for another format."""
    if disk.format == "raw":
        return Path(disk.path).stat().st_size
    if disk.format == "qcow2":
        with open(disk.path, "rb") as handle:
            header = handle.read(32)
        if header[:4] != b"QFI\xfb" or len(header) < 32:
            raise VmError(f"{disk.path}: not a qcow2 image")
        return int.from_bytes(header[24:32], "big")
    raise VmError(f"{disk.path}: cannot size a {disk.format} disk for a saved guest")


def _userland_index(config: MachineConfig) -> int | None:
    """Which of ``config.disks`` is the userland image (``stonelab.userland=vdX`` on the command line)."""
    for word in config.append.split():
        if word.startswith("stonelab.userland=vd"):
            return ord(word[-1]) - ord("a")
    return None


def _disk_key(disk: DiskSpec, userland: bool) -> str:
    if userland:
        return f"userland:{_stat(disk.path)}:{disk.format}"
    return f"{'ro' if disk.readonly else 'rw'}:{virtual_size(disk)}:{BLOCKDEV_CACHE[disk.cache][2]}"


def state_key(config: MachineConfig, qemu: str) -> str:
    """sha256 (24 hex digits) of what shapes a saved guest (see the module docstring)."""
    if config.share_host_root:
        raise VmError("a guest with the host root over 9p cannot be saved (QEMU refuses to migrate a 9p export); "
                      "use the EROFS userland image")
    if config.uefi or config.kernel is None or not config.agent:
        raise VmError("only agent guests booted directly from a kernel can be saved and restored")
    userland = _userland_index(config)
    parts = [FORMAT_VERSION, _stat(Path(qemu)), _stat(config.kernel.image), _stat(config.initrd), config.append,
             str(config.memory_mb), str(config.cpus), config.machine_type, config.accel.accel,
             *(_disk_key(disk, number == userland) for number, disk in enumerate(config.disks)),
             *config.extra_args]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _placeholders(config: MachineConfig, directory: Path) -> MachineConfig:
    """``config`` with every disk but the userland image replaced by a blank sparse raw file of the same virtual
    size (read-only where the disk is; nothing recorded)."""
    userland = _userland_index(config)
    disks = []
    for number, disk in enumerate(config.disks):
        if number == userland:
            disks.append(disk)
            continue
        blank = directory / f"placeholder{number}.img"
        with open(blank, "wb") as handle:
            handle.truncate(virtual_size(disk))
        disks.append(dataclasses.replace(disk, path=blank, format="raw", log=None))
    return dataclasses.replace(config, disks=disks, extra_args=list(config.extra_args))


def saved_state(config: MachineConfig, *, qemu: str | None = None, cache: Path | None = None,
                boot_timeout: float = 300.0) -> Path:
    """The saved state for ``config`` (booted, agent ready, its zygote — ``vm.zygote`` — warm: the lab's modules
    imported, the guest's page cache holding them), from the cache or made now. Raises VmError when the guest cannot be saved."""
    from vm.host import qemu_binary
    from vm.machine import Machine

    qemu = qemu or qemu_binary()
    key = state_key(config, qemu)
    directory = (cache or cache_dir()) / "snapshots"
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / f"guest-{key}.state"
    with open(directory / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run saving the same guest: wait, then use its state
        if state.is_file():
            return state
        with nested(log, f"saving a booted guest as {state.name}"), \
                tempfile.TemporaryDirectory(dir=directory, prefix=".save-") as tmp:
            part = Path(tmp) / "state"
            with Machine(_placeholders(config, Path(tmp)), name="snapshot", boot_timeout=boot_timeout,
                         qemu=qemu) as machine:
                # the agent's zygote imports the lab's modules now, so every restored guest has it warm
                machine.succeed([_python(config), "-c", "pass"], timeout=boot_timeout, warm=True)
                _migrate_to(machine, part)
            os.replace(part, state)
        _drop_stale(directory, state)
    return state


def _python(config: MachineConfig) -> str:
    """The guest's interpreter, from the kernel command line ``agent_config`` wrote."""
    for word in config.append.split():
        if word.startswith("stonelab.python="):
            return word.split("=", 1)[1]
    return "python3"


def _migrate_to(machine, part: Path, timeout: float = 300.0) -> None:
    qmp = machine.qmp()
    qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(part))}"})
    deadline = time.monotonic() + timeout
    while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise VmError(f"{part}: saving the guest took longer than {timeout:g}s")
        time.sleep(0.05)
    if status != "completed":
        raise VmError(f"{part}: saving the guest failed: {json.dumps(qmp.execute('query-migrate'))[:300]}")


def _drop_stale(directory: Path, keep: Path, age: float = 3600.0) -> None:
    for stale in directory.glob("guest-*.state"):
        if stale != keep and stale.stat().st_mtime < keep.stat().st_mtime - age:
            stale.unlink(missing_ok=True)


def resume(machine) -> None:
    """After a restore: the guest forgets the placeholder disks' blocks and partition tables, reads its real
    disks' ones, and takes the host's clock (the saved one is stale)."""
    machine.agent.rescan_disks()
    machine.succeed(["date", "-u", "-s", f"@{time.time():.3f}"])
