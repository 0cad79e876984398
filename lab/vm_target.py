"""The VM target: the system under test on its own virtio disk in a QEMU guest, where a crash is a power cut.

The guest runs this project from the read-only EROFS userland image (``vm.userland``: same paths as on the host),
with the root under test — an ext4 partition of a GPT disk built without loop mounts — mounted at ``/mnt/sut``.
Every power-on restores a guest saved right after boot (``vm.snapshot``) instead of booting, unless
``snapshots=False``; the packages a step installs are copied into the guest's ``/tmp`` by the agent.  A crash step runs the package
manager with ``STONELAB_FAULT=<point>:pause``; the moment the guest announces the point on its ``stonelab``
virtio-serial port, the host SIGKILLs QEMU.  With ``cache=unsafe`` the guest's page cache and the disk's
volatile state die with it.  Periodic writeback and ext4's periodic journal commit are switched off in the guest,
so the outcome does not depend on timers: what survives is what the software under test flushed.  The next step
powers the machine on again, and the journal replay and the package manager's recovery face whatever the disk
holds.
"""
from __future__ import annotations

import json
import os
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
from vm.errors import VmError
from vm.log import get_logger
from vm.machine import PROJECT_DIR, Machine, agent_config
from vm.qemu import DiskSpec
from vm.snapshot import resume, saved_state

log = get_logger("lab.vm_target")
GUEST_ROOT = "/mnt/sut"
GUEST_PACKAGES = "/tmp/stonelab-packages"
SUT_PARTITION = "/dev/vda2"
EXT4_COMMIT_SECONDS = 3600


class VmTarget:
    kind = TargetKind.VM
    crash_semantics = ("power cut: QEMU is SIGKILLed the moment the guest announces the fault point; the guest's "
                       "page cache is lost and, with periodic writeback and journal commits disabled, exactly what "
                       "the software flushed (fsync/syncfs) survives")

    def __init__(self, workdir: Path, *, kernel: Kernel | None = None, accel: str = "auto",
                 selector: AccelSelector | None = None, root_mib: int = 256, snapshots: bool = True,
                 keep: Path | None = None):
        self.workdir = workdir
        self.keep = keep
        self.root = Path(GUEST_ROOT)
        seed = workdir / "seed"
        (seed / "etc").mkdir(parents=True, exist_ok=True)
        (seed / "etc" / "hostname").write_text("stonelab\n")
        (seed / "var" / "lib" / "lab").mkdir(parents=True, exist_ok=True)
        (seed / "var" / "lib" / "lab" / "keep").write_text("user data\n")
        self.disk = build_disk(workdir / "sut.img", DiskLayout(esp_mib=64, root_mib=root_mib), root_tree=seed)
        self.kernel = kernel or default_kernel()
        self.accel: AccelChoice = (selector or AccelSelector()).choose(self.kernel, accel)
        config = agent_config(self.kernel, self.accel, [DiskSpec(self.disk.path)])
        self.machine = Machine(config, name="sut", crash_on_fault=True, console_log=workdir / "console.log",
                               restore_from=saved_state(config) if snapshots else None)
        self.boots = 0
        self._pushed: dict[Path, str] = {}
        try:
            self.power_on()
        except BaseException:
            self.machine.close()
            raise

    def describe(self) -> str:
        return f"QEMU guest, kernel {self.kernel.image.name}, {self.accel.describe()}"

    def power_on(self) -> None:
        if self.machine.running:
            return
        try:
            self.machine.start()
        except VmError as err:
            if self.machine.restore_from is None:
                raise
            # a saved state QEMU cannot load (another QEMU build, a damaged file): drop it and boot instead
            log.warning("restoring %s failed (%s); booting instead", self.machine.restore_from, err)
            self.machine.restore_from.unlink(missing_ok=True)
            self.machine.restore_from = None
            self.machine.start()
        self.boots += 1
        self._pushed.clear()  # the guest's /tmp starts empty on every power-on
        if self.machine.restore_from is not None:
            resume(self.machine)
        # Deterministic power cuts: no periodic writeback and no periodic journal commit, so what survives a
        # cut is exactly what the software under test flushed (fsync, syncfs) — not what a timer happened to
        # write. This is also how Asterinas behaves (it has no writeback thread).
        self.machine.succeed("echo 0 > /proc/sys/vm/dirty_writeback_centisecs && "
                             "echo 360000 > /proc/sys/vm/dirty_expire_centisecs")
        self.machine.succeed(f"mkdir -p {GUEST_ROOT} && "
                             f"mount -t ext4 -o commit={EXT4_COMMIT_SECONDS} {SUT_PARTITION} {GUEST_ROOT}")

    def _python(self, argv: list[str], env: str = "", timeout: float = COMMAND_TIMEOUT):
        self.power_on()
        command = f"cd {shlex.quote(str(PROJECT_DIR))} && {env}{shlex.quote(sys.executable)} {shlex.join(argv)}"
        return self.machine.execute(command, timeout)

    def stonelab(self, args: list[str], *, fault: str | None = None) -> CommandResult:
        argv = ["-m", "stonelab.cli", *args]
        env = f"STONELAB_FAULT={shlex.quote(fault + ':pause')} " if fault else ""
        started = time.monotonic()
        try:
            result = self._python(argv, env)
        except StonelabError as err:
            crashed = bool(fault) and self.machine.faults is not None and fault in self.machine.faults.points
            if not crashed:
                raise
            self.machine.crash()  # the watcher only sent SIGKILL; make sure QEMU is gone and reaped
            return CommandResult(["stonelab", *args], -9, "", f"power cut at {fault}: {err}",
                                 time.monotonic() - started, crashed=True)
        return CommandResult(["stonelab", *args], result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started)

    def path_for_package(self, path: Path) -> str:
        """The guest path of a host package file, copied into the guest's /tmp once per power-on."""
        self.power_on()
        if path not in self._pushed:
            guest = f"{GUEST_PACKAGES}/{len(self._pushed)}-{path.name}"
            self.machine.succeed(["mkdir", "-p", GUEST_PACKAGES])
            self.machine.write_file(guest, path.read_bytes())
            self._pushed[path] = guest
        return self._pushed[path]

    def observe(self) -> Observation:
        result = self._python(["-m", "lab.probe", GUEST_ROOT])
        if result.exit_code != 0:
            raise StonelabError(f"lab.probe failed in the guest: {result.stderr.strip()[-300:]}")
        return Observation(**json.loads(result.stdout))

    def corrupt_asset(self) -> str:
        result = self._python(["-m", "lab.faults", "corrupt-asset", GUEST_ROOT])
        if result.exit_code != 0:
            raise StonelabError(f"corrupting an asset in the guest failed: {result.stderr.strip()[-300:]}")
        return result.stdout.strip()

    def console_text(self) -> str:
        """The guest's serial console so far (every boot of this target)."""
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.machine.close()
        if self.keep is not None:  # --shell-on-failure: the disk outlives the run's temporary directory
            self.keep.mkdir(parents=True, exist_ok=True)
            os.replace(self.disk.path, self.keep / self.disk.path.name)

    def __enter__(self) -> VmTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vm_target_factory(kernel: str | None = None, accel: str = "auto", *, snapshots: bool = True,
                      keep: Path | None = None):
    """One accelerator probe for the whole run, one fresh disk and guest per scenario. ``keep``: a directory the
    system disk of each target is moved to when it closes (``keep/<n>/sut.img``, for a shell after a failure)."""
    selector = AccelSelector()
    image = kernel_from_path(Path(kernel)) if kernel else None
    made = [0]

    def make(workdir: Path) -> VmTarget:
        made[0] += 1
        return VmTarget(workdir, kernel=image, accel=accel, selector=selector, snapshots=snapshots,
                        keep=keep / str(made[0]) if keep else None)
    return make
