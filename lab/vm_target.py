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

Recording (``record=True``, the default): each boot is a *generation*.  The guest's system disk is a qcow2 overlay
over the image the boot started from (kept untouched, and attached read-only as the guest's second disk,
``/dev/vdb``), and QEMU's blklogwrites driver logs every write and flush of the boot into ``gen-N.log``.  The
log's length is read at each timeline mark — a command starts, returns (with its exit status), a fault point is
announced — so the crash engine (``lab/crash``) knows which writes had been issued at each moment and can
rebuild, in the same guest, every state a power cut could leave.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.crash.logwrites import read_log
from lab.crash.model import Model, PowerLoss
from lab.probe import DAMAGED_EXIT, Observation
from lab.steps import StepFailure
from lab.target import COMMAND_TIMEOUT, CommandResult, TargetKind
from reference_impl import mutants
from stonelab.errors import StonelabError
from vm.accel import AccelChoice, AccelSelector
from vm.disk import DiskLayout, build_disk
from vm.host import Kernel, default_kernel, kernel_from_path
from vm.errors import VmError
from vm.log import get_logger
from vm.machine import PROJECT_DIR, Machine, agent_config
from vm.qemu import DiskSpec
from vm.snapshot import resume, saved_state
from vm.transport import ConsoleTransport
from reference_impl.boot.esp import MtoolsEsp

log = get_logger("lab.vm_target")
GUEST_ROOT = "/mnt/sut"
GUEST_PACKAGES = "/tmp/stonelab-packages"
SUT_PARTITION = "/dev/vda2"
BASE_PARTITION = "/dev/vdb2"  # the generation's starting image, read-only (recording targets only)
GUEST_DISK = "/dev/vda"
LOADER_CONF = "loader/loader.conf"
UEFI_BOOT_TIMEOUT = 600  # OVMF + systemd-boot + the kernel under TCG on a loaded 2-core CI machine
EXT4_COMMIT_SECONDS = 3600


@dataclass(frozen=True)
class Mark:
    """A moment of the lab's timeline in the current generation's write log: ``log_bytes`` long at that time."""

    label: str  # start | return | fault:<point>
    log_bytes: int
    exit_status: int | None = None


@dataclass(frozen=True)
class Generation:
    """One boot of a recording target: the image it started from, the overlay it writes, its write log."""

    number: int
    base: Path
    base_format: str
    overlay: Path
    log: Path


class VmTarget:
    kind = TargetKind.VM
    @property
    def crash_semantics(self) -> str:
        """How a power cut on this target works, for every report (the model named first)."""
        return self.cut_semantics(self.power.model)

    def cut_semantics(self, model: Model) -> str:
        how = ("power cut: QEMU is SIGKILLed the moment the guest announces the fault point (or the seeded "
               "moment); the guest's page cache is lost and, with periodic writeback and journal commits disabled, "
               "only what the software wrote out (fsync/syncfs) reached the disk")
        if model is Model.OPTIMISTIC or not self.record:
            return (f"optimistic power-loss model (every write the guest submitted survives, flushed or not; see "
                    f"docs/CRASH.md) — {how}")
        return (f"volatile-cache power-loss model (the disk keeps what it had up to the last completed FLUSH, plus "
                f"FUA writes; the rest of its write cache is lost; see docs/CRASH.md) — {how}, then the disk "
                f"drops its volatile write cache")

    def __init__(self, workdir: Path, *, kernel: Kernel | None = None, accel: str = "auto",
                 selector: AccelSelector | None = None, root_mib: int = 256, personality: str | None = None,
                 record: bool = True, root_fs: str = "ext4", snapshots: bool = True, keep: Path | None = None,
                 host_userland: bool = False, power: PowerLoss = PowerLoss(), cpus: int | None = None):
        self.workdir = workdir
        self.power = power  # what a power cut loses (recording targets; without recording: optimistic)
        self.keep = keep
        # a kernel personality (lab.kernel.emulate): the package manager runs under its seccomp filter, on the
        # profile's persistent root filesystem; otherwise ``root_fs`` (ext4, or ext2 as on Asterinas)
        self.personality = personality
        self.root_fs = root_fs
        self.emulation_plan: Path | None = None
        if personality:
            from lab.kernel.emulate import plan
            from lab.kernel.profile import load_profile
            profile = load_profile(personality)
            self.root_fs = profile.persistent_root or "ext4"
            # resolved here: the guest has neither the profile's syscall table (../shared/data) nor the headers
            workdir.mkdir(parents=True, exist_ok=True)
            self.emulation_plan = workdir / "personality-plan.json"
            self.emulation_plan.write_text(plan(profile, self.root_fs).to_json())
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
        self.record = record
        self.generation: Generation | None = None
        self._flattened = False  # the next generation starts from the raw image, not the last overlay
        self.marks: list[Mark] = []
        # The guest runs on the EROFS userland image and every power-on restores a guest saved after boot
        # (vm.snapshot), recording or not: a recording generation's overlay and read-only base are, to the guest,
        # a disk of the same size and a read-only one, rescanned after the restore. ``host_userland``: the system
        # under test is a program of the host (Nix, OSTree), which the image does not carry: the host root over
        # 9p, booted afresh.
        fast = not host_userland
        disks = [DiskSpec(self.disk.path)]
        if record:  # where each generation's base will be (/dev/vdb): the saved guest must have the same disks
            disks.append(DiskSpec(self.disk.path, readonly=True))
        # a recording guest gets two vCPUs: the crash engine checks crash states in parallel workers, one per vCPU
        config = agent_config(self.kernel, self.accel, disks, userland="image" if fast else "9p",
                              cpus=cpus or (2 if record else 1))
        self.machine = Machine(config, name="sut", crash_on_fault=True, console_log=workdir / "console.log",
                               restore_from=saved_state(config) if fast and snapshots else None)
        self.machine.on_fault = lambda point: self.mark(f"fault:{point}")
        self.boots = 0
        self.nofile: int | None = None  # RLIMIT_NOFILE (soft = hard) of the package manager: limit_open_files
        self._pushed: dict[Path, str] = {}
        self._copies = 0  # host files and directories copied into the guest's /tmp (their names' prefix)
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
        if self.record:
            self._new_generation()
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
        self.mount_root()

    def mount_root(self) -> None:
        """Mount the SUT partition at GUEST_ROOT (ext4: journal commits only when something forces them)."""
        options = [f"commit={EXT4_COMMIT_SECONDS}"] if self.root_fs == "ext4" else []
        if mutants.active("no-flush") and self.root_fs == "ext4":
            options.append("barrier=0")  # a seeded bug: fsync/syncfs write out but never send a cache FLUSH
        flags = f"-o {','.join(options)} " if options else ""
        self.machine.succeed(f"mkdir -p {GUEST_ROOT} && mount -t {self.root_fs} {flags}{SUT_PARTITION} {GUEST_ROOT}")

    def _new_generation(self) -> None:
        """The next boot writes a fresh overlay over what the disk holds now, and logs into a fresh file."""
        number = self.generation.number + 1 if self.generation else 1
        chained = self.generation is not None and not self._flattened
        base, fmt = (self.generation.overlay, "qcow2") if chained else (self.disk.path, "raw")
        self._flattened = False
        overlay, log = self.workdir / f"gen-{number}.qcow2", self.workdir / f"gen-{number}.log"
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt,
                               str(overlay)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StonelabError(f"{overlay}: qemu-img create failed: {proc.stderr.strip()}")
        log.write_bytes(b"")
        self.generation = Generation(number, base, fmt, overlay, log)
        self.marks = []
        self.machine.config.disks[:2] = [DiskSpec(overlay, format="qcow2", log=log),  # the userland image stays
                                         DiskSpec(base, format=fmt, readonly=True)]

    def mark(self, label: str, exit_status: int | None = None) -> Mark | None:
        """Note the current write-log length under ``label`` (None when not recording)."""
        if self.generation is None:
            return None
        mark = Mark(label, self.generation.log.stat().st_size, exit_status)
        self.marks.append(mark)
        return mark

    base_partition = BASE_PARTITION

    @property
    def root_partition(self) -> tuple[int, int]:
        """(byte offset, byte length) of the root file system on the disk."""
        layout = self.disk.layout
        return layout.root_offset, layout.root_mib * 1024 * 1024

    def run_guest(self, argv: list[str], timeout: float):
        """Run ``python argv`` in the guest (the project directory, this interpreter). A word naming something that
        exists below this target's work directory on the host (the crash engine's job) is replaced by its guest
        path (``path_for_package``)."""
        return self._python([self.path_for_package(Path(word)) if self._below_workdir(word) else word
                             for word in argv], timeout=timeout)

    def _below_workdir(self, word: str) -> bool:
        path = Path(word)
        return path.is_absolute() and path.is_relative_to(self.workdir) and path.exists()

    def _flatten(self) -> Path:
        """The disk as it is now, as one raw image (what OVMF and mtools read): the recording's overlay chain is
        converted into ``gen-<n>-flat.img``, which the next generation starts from. Raises StonelabError when
        qemu-img fails."""
        if self.generation is None:
            return self.disk.path
        return self._start_next_generation_from(self._raw_copy(self.generation.overlay, "qcow2", "flat"))

    def _raw_copy(self, source: Path, fmt: str, what: str) -> Path:
        flat = self.workdir / f"gen-{self.generation.number}-{what}.img"
        proc = subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", str(source), str(flat)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise StonelabError(f"{flat}: qemu-img convert failed: {proc.stderr.strip()}")
        return flat

    def _start_next_generation_from(self, flat: Path) -> Path:
        self.disk = dataclasses.replace(self.disk, path=flat)
        self._flattened = True
        return flat

    def lose_volatile_cache(self, power: PowerLoss) -> str:
        """After a power cut (QEMU killed): make the disk what ``power`` says survives, and start the next
        generation from it.  Volatile-cache: the generation's starting image plus every write up to the last
        completed FLUSH and the FUA writes after it — whatever else the guest had written sat in the disk's
        write cache and is gone.  Optimistic: the disk as QEMU left it.  Returns one line on what was lost.
        Raises StonelabError when the write log cannot be read or qemu-img fails."""
        if self.generation is None or power.model is Model.OPTIMISTIC:
            return "every write the guest had submitted survives (optimistic model)"
        flat = self._raw_copy(self.generation.base, self.generation.base_format, "cut")
        recording = read_log(self.generation.log, disk_bytes=flat.stat().st_size)
        state = power.worst_cut(recording)
        power.write_state(recording, state, flat)
        self._start_next_generation_from(flat)
        units, _forced = power.in_flight(recording, state.cut)
        return (f"{len(units) - len(state.persisted)} of the {len(units)} writes after the last completed flush "
                f"(log entry {state.boundary}) were in the volatile write cache and are lost")

    def _python(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT,
                nofile: int | None = None):
        """``python ARGV`` in the guest's project directory with ``env`` added, forked from the guest's warm
        interpreter (``vm.zygote``; the same result as a fresh process). With a RLIMIT_NOFILE to impose
        (``nofile``) a fresh process under ``ulimit -n``."""
        self.power_on()
        env = dict(env or {})
        mutant = os.environ.get(mutants.ENV_VAR)
        if mutant:  # the lab's own tests seed bugs in the system under test (reference_impl/mutants.py)
            env[mutants.ENV_VAR] = mutant
        command = [sys.executable, *argv]
        if nofile:
            return self.machine.execute(f"ulimit -n {nofile} && {shlex.join(command)}", timeout, env=env,
                                        cwd=str(PROJECT_DIR))
        return self.machine.execute(command, timeout, env=env, cwd=str(PROJECT_DIR), warm=True)

    def stonelab(self, args: list[str], *, fault: str | None = None, env: dict[str, str] | None = None,
                 trace: Path | None = None, cut_model: Model | None = None) -> CommandResult:
        """The package manager's CLI in the guest; ``fault`` (a fault point) or ``env`` (a seeded cut) ends it with
        a power cut, after which the disk loses what the power-loss model says (``cut_model``, default the
        target's).  Raises StonelabError when the guest fails otherwise."""
        argv = ["-m", "stonelab.cli", *args]
        if self.emulation_plan is not None:
            argv = ["-m", "lab.kernel.emulate", "--plan", self.path_for_package(self.emulation_plan), "--",
                    sys.executable, *argv]
        variables = {"STONELAB_FAULT": f"{fault}:pause"} if fault else {}
        variables.update(env or {})
        # trace: the host root is read-only in the guest, so the ALICE check judges host-target runs only
        started = time.monotonic()
        self.power_on()
        self.mark("start")
        try:
            result = self._python(argv, variables, nofile=self.nofile)
        except StonelabError as err:
            point = fault or ("cut" if env and "STONELAB_CUT" in env else None)
            crashed = bool(point) and self.machine.faults is not None and point in self.machine.faults.points
            if not crashed:
                raise
            self.machine.crash()  # the watcher only sent SIGKILL; make sure QEMU is gone and reaped
            lost = self.lose_volatile_cache(PowerLoss(cut_model) if cut_model else self.power)
            return CommandResult(["stonelab", *args], -9, "", f"power cut at {point}: {err}",
                                 time.monotonic() - started, crashed=True, lost=lost)
        self.mark("return", result.exit_code)
        return CommandResult(["stonelab", *args], result.exit_code, result.stdout, result.stderr,
                             time.monotonic() - started, timed_out=result.timed_out)

    def path_for_package(self, path: Path) -> str:
        """The guest path of a host file or directory (a package, a repository, a crash job): the same path over
        9p; on the userland image a copy in the guest's /tmp (a file once per power-on, a directory each time:
        its contents may have changed)."""
        if self.machine.config.share_host_root:
            return str(path)
        self.power_on()
        if path in self._pushed:
            return self._pushed[path]
        self._copies += 1
        guest = f"{GUEST_PACKAGES}/{self._copies}-{path.name}"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        targets = {file: guest if file == path else f"{guest}/{file.relative_to(path)}" for file in files}
        directories = {target.rsplit("/", 1)[0] for target in targets.values()}
        if path.is_dir():
            directories.add(guest)
        self.machine.succeed(["mkdir", "-p", GUEST_PACKAGES, *sorted(directories)])
        for file, target in targets.items():
            self.machine.write_file(target, file.read_bytes())
        if path.is_file():
            self._pushed[path] = guest
        return guest

    def observe(self, *, boot: bool = False) -> Observation:
        result = self._python(["-m", "lab.probe", GUEST_ROOT, *(["--disk", GUEST_DISK] if boot else [])])
        if result.exit_code == DAMAGED_EXIT:
            kernel = [line for line in self.console_text().splitlines() if "-fs error" in line][-3:]
            raise StepFailure(f"the root filesystem ({self.root_fs}) is damaged: {result.stderr.strip()[-300:]}"
                              + (f"; kernel: {' | '.join(line.strip() for line in kernel)}" if kernel else ""))
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

    def console_text(self) -> str:
        """The guest's serial console so far (every boot of this target)."""
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

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
        """Power off, then boot the SUT disk for real: OVMF → systemd-boot → the Type 1 entry ``entry`` (its id: the file
        name under loader/entries, or a glob loader.conf already holds; the lab makes it the one-time default in loader.conf and puts the
        original back afterwards). Returns (state id the initramfs found in /usr/.stateID, its moss.fstx=, the
        console's last lines). Raises StonelabError when no state is reported in time."""
        from lab.bootproof import BOOTED
        from vm.machine import uefi_config

        if self.machine.running:
            self.machine.succeed(f"sync && umount {GUEST_ROOT}")
            self.machine.shutdown()
        disk = self._flatten()  # a recording target's latest writes are in its overlay chain
        fat = MtoolsEsp(disk, self.disk.layout.esp_offset)
        original = fat.read(LOADER_CONF) or b""
        lines = [ln for ln in original.decode().splitlines() if not ln.startswith("default ")]
        fat.write_atomic(LOADER_CONF, "\n".join([f"default {entry}", *lines, ""]).encode())
        config = uefi_config(self.accel, DiskSpec(disk), agent=False, share_host_root=False)
        try:
            with Machine(config, name="sut-uefi", transport=ConsoleTransport(),
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
        if self.keep is not None:  # --shell-on-failure: the disk outlives the run's temporary directory
            self.keep.mkdir(parents=True, exist_ok=True)
            disk = self._flatten() if self.generation is not None else self.disk.path
            os.replace(disk, self.keep / "sut.img")

    def __enter__(self) -> VmTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vm_target_factory(kernel: str | None = None, accel: str = "auto", personality: str | None = None,
                      record: bool = True, *, snapshots: bool = True, keep: Path | None = None):
    """One accelerator probe for the whole run, one fresh disk and guest per scenario. ``keep``: a directory the
    system disk of each target is moved to when it closes (``keep/<n>/sut.img``, for a shell after a failure)."""
    selector = AccelSelector()
    image = kernel_from_path(Path(kernel)) if kernel else None
    made = [0]

    def make(workdir: Path) -> VmTarget:
        made[0] += 1
        return VmTarget(workdir, kernel=image, accel=accel, selector=selector, personality=personality,
                        record=record, snapshots=snapshots, keep=keep / str(made[0]) if keep else None)
    return make
