"""The VM target: the system under test on its own virtio disk in a QEMU guest, where a crash is a power cut.

The guest runs this project from the host root shared over 9p (same paths), with the root under test — an ext4
partition of a GPT disk built without loop mounts — mounted at ``/mnt/sut``.  A crash step runs the package
manager with ``STONELAB_FAULT=<point>:pause``; the moment the guest announces the point on its ``stonelab``
virtio-serial port, the host SIGKILLs QEMU.  With ``cache=unsafe`` the guest's page cache and the disk's
volatile state die with it.  Periodic writeback and ext4's periodic journal commit are switched off in the guest,
so the outcome does not depend on timers: what survives is what the software under test flushed.  The next step
powers the machine on again, and the journal replay and the package manager's recovery face whatever the disk
holds.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from lab.probe import Observation
from lab.target import COMMAND_TIMEOUT, CommandResult, TargetKind
from stonelab.errors import StonelabError
from vm.accel import AccelChoice, AccelSelector
from vm.disk import DiskLayout, build_disk
from vm.host import Kernel, default_kernel, kernel_from_path
from vm.machine import PROJECT_DIR, Machine, agent_config
from vm.errors import VmError
from vm.qemu import DiskSpec
from reference_impl.boot.esp import MtoolsEsp

GUEST_ROOT = "/mnt/sut"
SUT_PARTITION = "/dev/vda2"
GUEST_DISK = "/dev/vda"
LOADER_CONF = "loader/loader.conf"
UEFI_BOOT_TIMEOUT = 600  # OVMF + systemd-boot + the kernel under TCG on a loaded 2-core CI machine
EXT4_COMMIT_SECONDS = 3600


class VmTarget:
    kind = TargetKind.VM
    crash_semantics = ("power cut: QEMU is SIGKILLed the moment the guest announces the fault point; the guest's "
                       "page cache is lost and, with periodic writeback and journal commits disabled, exactly what "
                       "the software flushed (fsync/syncfs) survives")

    def __init__(self, workdir: Path, *, kernel: Kernel | None = None, accel: str = "auto",
                 selector: AccelSelector | None = None, root_mib: int = 256, personality: str | None = None):
        self.workdir = workdir
        # a kernel personality (lab.kernel.emulate): the package manager runs under its seccomp filter, on the
        # profile's persistent root filesystem
        self.personality = personality
        self.root_fs = "ext4"
        if personality:
            from lab.kernel.profile import load_profile
            self.root_fs = load_profile(personality).persistent_root or "ext4"
        self.root = Path(GUEST_ROOT)
        seed = workdir / "seed"
        (seed / "etc").mkdir(parents=True, exist_ok=True)
        (seed / "etc" / "hostname").write_text("stonelab\n")
        (seed / "var" / "lib" / "lab").mkdir(parents=True, exist_ok=True)
        (seed / "var" / "lib" / "lab" / "keep").write_text("user data\n")
        self.disk = build_disk(workdir / "sut.img", DiskLayout(esp_mib=64, root_mib=root_mib), root_tree=seed,
                               root_fs=self.root_fs)
        self.kernel = kernel or default_kernel()
        self.accel: AccelChoice = (selector or AccelSelector()).choose(self.kernel, accel)
        self.machine = Machine(agent_config(self.kernel, self.accel, [DiskSpec(self.disk.path)]), name="sut",
                               crash_on_fault=True, console_log=workdir / "console.log")
        self.boots = 0
        try:
            self.power_on()
        except BaseException:
            self.machine.close()
            raise

    def describe(self) -> str:
        personality = f", personality {self.personality} (root {self.root_fs})" if self.personality else ""
        return f"QEMU guest, kernel {self.kernel.image.name}, {self.accel.describe()}{personality}"

    def power_on(self) -> None:
        if self.machine.running:
            return
        self.machine.start()
        self.boots += 1
        # Deterministic power cuts: no periodic writeback and no periodic journal commit, so what survives a
        # cut is exactly what the software under test flushed (fsync, syncfs) — not what a timer happened to
        # write. This is also how Asterinas behaves (it has no writeback thread).
        self.machine.succeed("echo 0 > /proc/sys/vm/dirty_writeback_centisecs && "
                             "echo 360000 > /proc/sys/vm/dirty_expire_centisecs")
        options = f"-o commit={EXT4_COMMIT_SECONDS}" if self.root_fs == "ext4" else ""
        self.machine.succeed(f"mkdir -p {GUEST_ROOT} && mount -t {self.root_fs} {options} {SUT_PARTITION} {GUEST_ROOT}")

    def _python(self, argv: list[str], env: str = "", timeout: float = COMMAND_TIMEOUT):
        self.power_on()
        command = f"cd {shlex.quote(str(PROJECT_DIR))} && {env}{shlex.quote(sys.executable)} {shlex.join(argv)}"
        return self.machine.execute(command, timeout)

    def stonelab(self, args: list[str], *, fault: str | None = None, env: dict[str, str] | None = None,
                 trace: Path | None = None) -> CommandResult:
        argv = ["-m", "stonelab.cli", *args]
        if self.personality:
            argv = ["-m", "lab.kernel.emulate", "--profile", self.personality, "--", sys.executable, *argv]
        prefix = f"STONELAB_FAULT={shlex.quote(fault + ':pause')} " if fault else ""
        prefix += "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        # trace: the host root is read-only in the guest, so the ALICE check judges host-target runs only
        started = time.monotonic()
        try:
            result = self._python(argv, prefix)
        except StonelabError as err:
            point = fault or ("cut" if env and "STONELAB_CUT" in env else None)
            crashed = bool(point) and self.machine.faults is not None and point in self.machine.faults.points
            if not crashed:
                raise
            self.machine.crash()  # the watcher only sent SIGKILL; make sure QEMU is gone and reaped
            return CommandResult(["stonelab", *args], -9, "", f"power cut at {fault}: {err}",
                                 time.monotonic() - started, crashed=True)
        return CommandResult(["stonelab", *args], result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started)

    def path_for_package(self, path: Path) -> str:
        return str(path)  # the host root is the guest's root: same path

    def observe(self, *, boot: bool = False) -> Observation:
        result = self._python(["-m", "lab.probe", GUEST_ROOT, *(["--disk", GUEST_DISK] if boot else [])])
        if result.exit_code != 0:
            raise StonelabError(f"lab.probe failed in the guest: {result.stderr.strip()[-300:]}")
        return Observation(**json.loads(result.stdout))

    def corrupt_asset(self) -> str:
        return self.inject("corrupt-asset")

    def inject(self, action: str, arg: str = "") -> str:
        result = self._python(["-m", "lab.faults", action, GUEST_ROOT, GUEST_DISK, arg])
        if result.exit_code != 0:
            raise StonelabError(f"{action} in the guest failed: {result.stderr.strip()[-300:]}")
        return result.stdout.strip()

    def boot_args(self) -> list[str]:
        # the ESP partition's device node (mtools on the whole disk at the ESP's offset fails in the guest)
        return ["--esp", f"{GUEST_DISK}1", "--root-device", f"{GUEST_DISK}:2"]

    def shell(self, command: str) -> CommandResult:
        self.power_on()
        started = time.monotonic()
        result = self.machine.execute(f"cd {GUEST_ROOT} && STONELAB_ROOT={GUEST_ROOT} {command}", COMMAND_TIMEOUT)
        return CommandResult(["sh", "-c", command], result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started)

    def count_mutations(self, args: list[str]) -> int:
        """Calibration on a copy of the root inside the guest (same filesystem); ESP arguments are dropped, so
        a boot sync's calls are not counted."""
        copy = GUEST_ROOT + "-calibrate"
        self.machine.succeed(f"rm -rf {copy} && cp -a {GUEST_ROOT} {copy}")
        kept, skip = [], False
        for a in args:
            if skip:
                skip = False
            elif a in ("--esp", "--root-device"):
                skip = True
            else:
                kept.append(copy if a == GUEST_ROOT else a)
        self.stonelab(kept, env={"STONELAB_CUT": f"count:{copy}.count"})
        result = self.machine.execute(f"cat {copy}.count; rm -rf {copy} {copy}.count", 120)
        return int(result.stdout.strip() or 0) if result.stdout.strip().isdigit() else 0

    def boot_entry(self, entry: str) -> tuple[str, str, str]:
        """Power off, then boot the SUT disk for real: OVMF → systemd-boot → the Type 1 entry ``entry`` (a file
        name under loader/entries without .conf; the lab makes it the one-time default in loader.conf and puts the
        original back afterwards). Returns (state id the initramfs found in /usr/.stateID, its moss.fstx=, the
        console's last lines). Raises StonelabError when no state is reported in time."""
        from lab.bootproof import BOOTED
        from vm.machine import uefi_config

        if self.machine.running:
            self.machine.succeed(f"sync && umount {GUEST_ROOT}")
            self.machine.shutdown()
        fat = MtoolsEsp(self.disk.path, self.disk.layout.esp_offset)
        original = fat.read(LOADER_CONF) or b""
        lines = [ln for ln in original.decode().splitlines() if not ln.startswith("default ")]
        fat.write_atomic(LOADER_CONF, "\n".join([f"default {entry}", *lines, ""]).encode())
        config = uefi_config(self.accel, DiskSpec(self.disk.path), agent=False, share_host_root=False)
        try:
            with Machine(config, name="sut-uefi", transport="console",
                         console_log=self.workdir / f"uefi-{self.boots}.log") as firmware:
                try:
                    firmware.wait_for_console(BOOTED.pattern, UEFI_BOOT_TIMEOUT)
                    firmware.wait_for_exit(60)
                except VmError as err:
                    raise StonelabError(f"UEFI boot of entry {entry} reported no state: {err}") from None
                found = BOOTED.findall(firmware.console.text)
                tail = "\n".join(firmware.console.tail()[-8:])
        finally:
            fat.write_atomic(LOADER_CONF, original)
        state, fstx = found[-1]
        return state, fstx, tail

    def reboot(self) -> str:
        """A clean shutdown (the guest syncs and unmounts), then power on again."""
        self.power_on()
        self.machine.succeed(f"sync && umount {GUEST_ROOT}")
        self.machine.shutdown()
        self.power_on()
        return f"clean shutdown and power on (boot {self.boots})"

    def close(self) -> None:
        self.machine.close()

    def __enter__(self) -> VmTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vm_target_factory(kernel: str | None = None, accel: str = "auto", personality: str | None = None):
    """One accelerator probe for the whole run, one fresh disk and guest per scenario."""
    selector = AccelSelector()
    image = kernel_from_path(Path(kernel)) if kernel else None

    def make(workdir: Path) -> VmTarget:
        return VmTarget(workdir, kernel=image, accel=accel, selector=selector, personality=personality)
    return make
