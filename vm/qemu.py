"""The QEMU command line of a lab guest, built from a MachineConfig (pure: no process is started here).

Disk cache mode — what a `crash()` loses
----------------------------------------
``crash()`` SIGKILLs QEMU; the host kernel keeps running.  Whatever QEMU already handed to the host (``pwrite``)
is therefore in the host page cache and survives, whatever the ``cache=`` mode.  What a power cut loses is what
the *guest* had not yet submitted to its disk: its page cache, its journal commit in flight, its queued
requests — exactly a real machine's volatile state.  The modes differ in what the guest is told and what the host
does on a flush:

* ``unsafe`` (default): the virtio disk advertises a volatile write cache (WCE), so the guest's filesystems
  issue FLUSH/FUA as they do on real disks, and QEMU skips the host ``fdatasync`` for them — nothing of the
  guest's durability logic is bypassed, the guest just does not pay for host syncs that a QEMU kill cannot
  need.  The only difference to ``writeback`` appears if the *host* crashes, which the lab does not model.
* ``writeback``: same guest view; flushes become host ``fdatasync`` (slower, host-crash safe).
* ``none``: O_DIRECT on the host, guest still sees a write cache; ``directsync``/``writethrough``: the guest
  sees *no* write cache (WCE=0) and stops sending flushes — use them to check behaviour on write-through disks,
  never to test flush ordering.

Recording a disk (``DiskSpec(log=PATH)``)
-----------------------------------------
QEMU's ``blklogwrites`` filter driver (QEMU ≥ 3.0; ``block/blklogwrites.c``) sits between the guest's virtio
disk and the image and appends every write, write-zeroes, discard and flush to a second file in the
dm-log-writes format (``lab/crash/logwrites.py`` reads it).  The chain is built with ``-blockdev``:
image protocol node → format node → ``blklogwrites`` (``log`` = a protocol node on the log file,
``log-sector-size``) → ``virtio-blk-pci,write-cache=on``.  The filter node itself keeps flushes (``cache.no-flush``
off): the block layer skips a node's flush callback when that node has ``no-flush``, which would silently drop
every FLUSH entry.  The protocol nodes below get the cache mode's host-side settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vm.accel import AccelChoice
from vm.host import Kernel

CACHE_MODES = ("unsafe", "writeback", "none", "directsync", "writethrough")
# -drive cache=MODE as -blockdev settings: (cache.direct, cache.no-flush, the device's write-cache)
BLOCKDEV_CACHE = {"unsafe": ("off", "on", "on"), "writeback": ("off", "off", "on"), "none": ("on", "off", "on"),
                  "directsync": ("on", "off", "off"), "writethrough": ("off", "off", "off")}
LOG_SECTOR_SIZE = 512
DEFAULT_CACHE = "unsafe"
AGENT_PORT = "org.stonelab.agent"
FAULT_PORT = "stonelab"
DEBUG_EXIT_SUCCESS = 33   # guest writes 0x10 → QEMU exits (0x10 << 1) | 1
DEBUG_EXIT_FAILURE = 65   # guest writes 0x20


@dataclass(frozen=True)
class DiskSpec:
    """One virtio disk. ``log``: record every write, flush and discard the guest sends to it into that file
    (blklogwrites; the file must exist, empty); ``log_sector_size`` in bytes is the unit of the log's sector
    fields and the alignment QEMU enforces on the guest's requests."""

    path: Path
    cache: str = DEFAULT_CACHE
    format: str = "raw"
    readonly: bool = False
    log: Path | None = None
    log_sector_size: int = LOG_SECTOR_SIZE

    def __post_init__(self) -> None:
        from vm.errors import VmError
        if self.cache not in CACHE_MODES:
            raise VmError(f"{self.path}: unknown disk cache mode {self.cache!r} (valid: {', '.join(CACHE_MODES)})")
        if self.log is not None and BLOCKDEV_CACHE[self.cache][2] == "off":
            raise VmError(f"{self.path}: cache={self.cache} shows the guest a write-through disk, which sends no "
                          "flushes; a recording needs unsafe, writeback or none")
        if self.log is not None and self.readonly:
            raise VmError(f"{self.path}: a read-only disk has no writes to record")

    def blockdev_args(self, number: int) -> tuple[list[str], str, str]:
        """(``-blockdev`` argv, the top node's name, the device's ``write-cache``) for a recorded disk."""
        direct, no_flush, write_cache = BLOCKDEV_CACHE[self.cache]
        cache = f"cache.direct={direct},cache.no-flush={no_flush}"
        image, fmt, log, top = (f"disk{number}-{part}" for part in ("file", "fmt", "logfile", "rec"))
        args = ["-blockdev", f"driver=file,node-name={image},filename={self.path},{cache}",
                "-blockdev", f"driver={self.format},node-name={fmt},file={image}",
                "-blockdev", f"driver=file,node-name={log},filename={self.log},{cache}",
                "-blockdev", f"driver=blklogwrites,node-name={top},file={fmt},log={log},"
                             f"log-sector-size={self.log_sector_size},cache.no-flush=off"]
        return args, top, write_cache


@dataclass(frozen=True)
class UefiSpec:
    code: Path
    vars_template: Path      # copied once per machine: the machine writes only its private copy


@dataclass
class MachineConfig:
    accel: AccelChoice
    kernel: Kernel | None = None          # direct kernel boot (None: firmware boots from a disk)
    initrd: Path | None = None
    append: str = ""
    memory_mb: int = 1024
    cpus: int = 1
    machine_type: str = "q35"
    disks: list[DiskSpec] = field(default_factory=list)
    share_host_root: bool = True
    agent: bool = True
    uefi: UefiSpec | None = None
    debug_exit: bool = False
    ssh_forward_port: int | None = None   # user networking with 127.0.0.1:PORT → guest :22
    extra_args: list[str] = field(default_factory=list)
    # multiboot modules in order, each "PATH[ ARGS]" (a multiboot kernel only; ``initrd`` then unused)
    multiboot_modules: tuple[str, ...] = ()


def qemu_args(config: MachineConfig, sockets: Path, uefi_vars: Path | None = None) -> list[str]:
    """argv (without the binary) for ``config``; unix sockets are created in ``sockets``; ``uefi_vars`` is the
    machine's private copy of the UEFI variable store."""
    kvm = config.accel.accel == "kvm"
    args = ["-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "max", "-M", config.machine_type,
            "-m", str(config.memory_mb), "-smp", str(config.cpus), "-nodefaults", "-display", "none",
            "-vga", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none",
            "-qmp", f"unix:{sockets / 'qmp.sock'},server=on,wait=off"]
    if config.uefi:
        args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={config.uefi.code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    if config.kernel is not None:
        args += ["-kernel", str(config.kernel.image)]
        if config.multiboot_modules:  # QEMU's multiboot loader: modules separated by "," (a literal one doubled)
            args += ["-initrd", ",".join(m.replace(",", ",,") for m in config.multiboot_modules)]
        elif config.initrd:
            args += ["-initrd", str(config.initrd)]
        if config.append:
            args += ["-append", config.append]
    for number, disk in enumerate(config.disks):
        boot = ",bootindex=0" if number == 0 and config.kernel is None else ""
        if disk.log is not None:
            blockdev, node, write_cache = disk.blockdev_args(number)
            args += [*blockdev, "-device", f"virtio-blk-pci,drive={node},write-cache={write_cache}{boot}"]
            continue
        readonly = ",readonly=on" if disk.readonly else ""
        args += ["-drive", f"file={disk.path},if=none,id=disk{number},format={disk.format},"
                           f"cache={disk.cache}{readonly}",
                 "-device", f"virtio-blk-pci,drive=disk{number}{boot}"]
    if config.share_host_root:
        args += ["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"]
    if config.agent:
        args += ["-device", "virtio-serial-pci,id=vser",
                 "-chardev", f"socket,id=agent,path={sockets / 'agent.sock'},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
                 "-chardev", f"socket,id=fault,path={sockets / 'fault.sock'},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser.0,chardev=fault,name={FAULT_PORT}"]
    if config.debug_exit:
        args += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    if config.ssh_forward_port is not None:
        args += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{config.ssh_forward_port}-:22",
                 "-device", "virtio-net-pci,netdev=net0"]
    return args + list(config.extra_args)


def debug_exit_outcome(status: int | None) -> str:
    """QEMU's exit status after a guest wrote to isa-debug-exit: 33 is success, 65 failure (the conventions of
    Asterinas' and other foreign kernels' test runners); anything else is "no verdict"."""
    return {DEBUG_EXIT_SUCCESS: "success", DEBUG_EXIT_FAILURE: "failure"}.get(status, "no verdict")


def agent_append(python: str, project: str, mode: str = "agent", extra: str = "") -> str:
    """The kernel command line of an agent guest booted with the lab's initramfs."""
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can starve and panic ("IO-APIC +
    # timer doesn't work!"); virtual machines do not need it (virtme-ng passes it too).
    parts = ["console=ttyS0", "quiet", "panic=-1", "no_timer_check", f"stonelab.mode={mode}", f"stonelab.python={python}",
             f"stonelab.project={project}", extra]
    return " ".join(part for part in parts if part)
