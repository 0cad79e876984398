"""Gaps between what the reference implementation uses (a trace) and what a kernel offers (a probe of the
running kernel, or a documented profile), each with its consequence for an AerynOS-style system and the
workaround — what a porter needs to know."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lab.kernel.trace import Feature, Trace
from stonelab.errors import StonelabError

PROFILE_DIR = Path(__file__).resolve().parent
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# probe feature name → trace feature key
PROBE_FEATURES = {
    "renameat2_exchange": "renameat2:RENAME_EXCHANGE",
    "rename_symlink_over_symlink": "rename",
    "rename_directory": "rename:directory",
    "linkat": "linkat:0",
    "symlinkat": "symlinkat",
    "mkdirat": "mkdirat",
    "openat_create_excl": "openat:O_NOFOLLOW|O_EXCL",
    "fchmod": "fchmod",
    "fchown": "fchown",
    "fsync": "fsync",
    "fdatasync": "fdatasync",
    "syncfs": "syncfs",
    "fsync_directory": "fsync:directory",
    "ioctl_ficlone": "ioctl:FICLONE",
    "copy_file_range": "copy_file_range",
    "sendfile": "sendfile",
    "open_tmpfile": "openat:O_TMPFILE",
    "flock_exclusive_nonblocking": "flock:LOCK_EX|LOCK_NB",
    "setrlimit_nofile": "prlimit64:RLIMIT_NOFILE",
    "statx": "statx",
    "unshare_newns": "unshare:CLONE_NEWNS",
    "mount_make_rprivate": "mount:MS_PRIVATE|MS_REC",
    "mount_bind": "mount:MS_BIND",
    "mount_bind_readonly": "mount:MS_BIND|MS_RDONLY|MS_REMOUNT",
    "chroot": "chroot",
    "mount_vfat": "mount:vfat",
}


@dataclass(frozen=True)
class Impact:
    consequence: str
    workaround: str
    severity: str  # blocker | degraded | benign


# What each feature's absence means, for upstream moss and for the reference.
IMPACTS: dict[str, Impact] = {
    "renameat2:RENAME_EXCHANGE": Impact(
        "the atomic /usr swap fails: upstream moss aborts every install, remove and rollback after the blit "
        "(staging left behind, #576)",
        "swap with a /usr symlink replaced by rename(2): `--swap symlink` (the reference chooses it by itself "
        "when its probe sees the refusal); a kernel patch implementing RENAME_EXCHANGE for the root filesystem",
        "blocker"),
    "rename": Impact("neither swap strategy can switch /usr atomically", "none short of a kernel fix", "blocker"),
    "rename:directory": Impact("old trees cannot be archived, staging cannot be moved", "none", "blocker"),
    "linkat:0": Impact("the blit cannot hard-link from the store", "`--blit copy` (full copies: slower, more disk)",
                       "degraded"),
    "symlinkat": Impact("symlinks in packages and root links cannot be created", "none", "blocker"),
    "symlink": Impact("root links (/bin, /lib, …) and the symlink swap cannot be made", "none", "blocker"),
    "mkdirat": Impact("the blit cannot build directories", "none", "blocker"),
    "fchmod": Impact("file modes cannot be applied", "none", "blocker"),
    "fchown": Impact("file owners cannot be applied", "ownership ignored (files owned by root)", "degraded"),
    "ioctl:FICLONE": Impact("no reflinks: the reflink probe fails", "hard links (the default fallback)", "benign"),
    "copy_file_range": Impact(
        "copies (the EXDEV fallback, `--blit copy`, mode/owner variants) fail where they use copy_file_range",
        "copy with read/write or sendfile(2), which the reference falls back to", "degraded"),
    "sendfile": Impact("copy fallback unavailable", "read/write loop", "benign"),
    "openat:O_TMPFILE": Impact("not used by the reference", "none needed", "benign"),
    "syncfs": Impact(
        "the reference cannot make a staged tree durable in one call before its intent record: a power cut "
        "after 'success' may lose or tear the transaction",
        "fsync every file and directory written (slower); on filesystems where syncfs is a no-op (tmpfs, "
        "virtio-fs) nothing is durable anyway", "degraded"),
    "fsync": Impact("single-file durability is partial; the intent record and ESP copies rely on it",
                    "follow with syncfs (the reference does before the swap)", "degraded"),
    "fdatasync": Impact("SQLite commits are not durable", "PRAGMA synchronous=FULL plus syncfs", "degraded"),
    "fsync:directory": Impact("renames are not durable until the next syncfs", "syncfs after each rename", "degraded"),
    "flock:LOCK_EX|LOCK_NB": Impact("two package managers can run at once and corrupt the installation",
                                    "fcntl(F_SETLK) locks", "degraded"),
    "prlimit64:RLIMIT_NOFILE": Impact("wide trees may hit EMFILE (#841)", "the blit uses directory fds sparingly",
                                      "benign"),
    "unshare:CLONE_NEWNS": Impact("transaction triggers cannot be sandboxed", "`--no-triggers`", "degraded"),
    "unshare:CLONE_NEWNS|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWPID|CLONE_NEWNET": Impact(
        "the full trigger sandbox (PID and network namespaces too) cannot be made; upstream moss's container "
        "(which also needs user namespaces) cannot start, so its triggers fail",
        "the reference falls back to mount+UTS+IPC namespaces: /etc stays read-only and the host root out of "
        "reach, but triggers share the PID and network namespaces", "degraded"),
    "mount:MS_PRIVATE|MS_REC": Impact("trigger mounts would leak into the host namespace", "none", "degraded"),
    "mount:MS_BIND": Impact("triggers cannot see the staged /usr", "`--no-triggers`", "degraded"),
    "mount:MS_BIND|MS_RDONLY|MS_REMOUNT": Impact("/etc cannot be made read-only for triggers",
                                                 "trust triggers not to write /etc", "degraded"),
    "chroot": Impact("triggers cannot run in the isolation root", "`--no-triggers`", "degraded"),
    "mount:vfat": Impact(
        "the ESP (FAT) cannot be mounted: boot entries cannot be written from the running system; upstream "
        "reports success having written nothing when it finds no ESP",
        "write the ESP without mounting (`stonelab boot sync --esp DISK.img` through mtools, from a rescue or "
        "host side), or keep the ESP managed by the firmware/GRUB as Asterinas NixOS does", "blocker"),
    "rseq": Impact("glibc registers restartable sequences at every thread start", "none needed: glibc treats "
                   "ENOSYS as 'not available'", "benign"),
    "writeback": Impact(
        "nothing written without an explicit sync ever reaches the disk: upstream moss (no fsync at all) loses "
        "whole transactions on a power cut, however long ago they finished",
        "the reference's syncfs/fsync points; `sync` before powering off", "degraded"),
}


@dataclass
class Gap:
    feature: str
    result: str  # ok | ERRNO | no-op | partial: …
    evidence: str  # probed | documented
    severity: str
    consequence: str
    workaround: str
    calls: int = 0
    phases: list[str] = field(default_factory=list)


UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def linux_syscall_numbers(header: Path = UNISTD) -> dict[str, int]:
    """x86-64 syscall names (as strace prints them) to numbers, from the kernel headers (linux-libc-dev)."""
    if not header.is_file():
        raise StonelabError(f"{header}: missing; it maps syscall names to numbers (Debian package linux-libc-dev)")
    numbers = {}
    for line in header.read_text().splitlines():
        match = re.match(r"#define __NR_(\w+)\s+(\d+)", line)
        if match:
            numbers[match[1]] = int(match[2])
    return numbers


@dataclass
class KernelProfile:
    name: str
    evidence: str
    results: dict[str, dict[str, str]]  # feature → fs → result
    syscalls: set[int] | None = None  # implemented x86-64 syscall numbers (None: unknown)
    numbers: dict[str, int] = field(default_factory=dict)

    def result(self, feature: str, filesystem: str) -> str | None:
        per_fs = self.results.get(feature)
        if per_fs is not None:
            return per_fs.get(filesystem, per_fs.get("*"))
        syscall = feature.split(":", 1)[0]
        number = self.numbers.get(syscall)
        if self.syscalls is not None and number is not None and number not in self.syscalls:
            return "ENOSYS"
        return None


def documented_profile(name: str, shared_data: Path = SHARED_DATA) -> KernelProfile:
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise StonelabError(f"{name}: no documented kernel profile (known: {', '.join(known)})")
    data = yaml.safe_load(path.read_text())
    table = shared_data / data["syscall_table"]
    if not table.is_file():
        raise StonelabError(f"{table}: the syscall table of {name} is missing (it lives in ../shared/data)")
    with open(table, newline="") as handle:
        syscalls = {int(row["number"]) for row in csv.DictReader(handle, delimiter="\t")}
    results = {k: {fs: str(v) for fs, v in per_fs.items()} for k, per_fs in data["results"].items()}
    return KernelProfile(data["name"], f"documented ({path.name}, syscall table {table.name})", results, syscalls,
                         linux_syscall_numbers())


_PROBE_LINE = re.compile(r"STONELAB-PROBE (?P<label>\S+) (?P<feature>\S+) (?P<outcome>ok|fail (?P<errno>E\w+|E\?) -?\d+)")


def probed_profile(name: str, console: str) -> KernelProfile:
    """A profile from the probe's console lines: the label of each run is the filesystem it probed."""
    results: dict[str, dict[str, str]] = {}
    done = set()
    for line in console.splitlines():
        if line.startswith("STONELAB-PROBE ") and line.rstrip().endswith(" done"):
            done.add(line.split()[1])
            continue
        match = _PROBE_LINE.search(line)
        if not match:
            continue
        key = PROBE_FEATURES.get(match["feature"], match["feature"])
        outcome = "ok" if match["outcome"] == "ok" else match["errno"]
        if match["feature"] == "renameat2_noreplace_refuses" or match["feature"] == "readonly_bind_enforced":
            key = match["feature"]
        results.setdefault(key, {})[match["label"]] = outcome
    if not results:
        raise StonelabError(f"{name}: the probe printed no results")
    return KernelProfile(name, f"probed ({', '.join(sorted(done)) or 'incomplete run'})", results)


def analyse(trace: Trace, profile: KernelProfile, filesystem: str, *, esp: bool = True) -> list[Gap]:
    """Every traced transaction feature (plus the boot path's vfat mount and writeback), judged on ``filesystem``."""
    features: list[Feature] = [f for f in trace.features if f.category == "transaction"
                               or profile.result(f.key, filesystem) == "ENOSYS"]
    # needs the trace cannot show: the ESP is written through mtools here (vfat mounted on a real system), and
    # durability without explicit syncs is not a call at all
    extra = ["mount:vfat", "writeback"] if esp else ["writeback"]
    known = {f.key for f in features}
    features += [Feature(key, key.split(":")[0], "", "transaction") for key in extra if key not in known]
    gaps = []
    for feature in features:
        result = profile.result(feature.key, filesystem)
        if result is None or result == "ok":
            continue
        impact = IMPACTS.get(feature.key) or Impact(
            f"{feature.syscall} fails with {result}: the calls the reference makes there "
            f"({', '.join(feature.phases[:3])}) fail", "unknown: needs investigation", "degraded")
        severity = impact.severity if result not in ("no-op",) or feature.key in ("syncfs", "fsync") else "benign"
        gaps.append(Gap(feature.key, result, profile.evidence, severity, impact.consequence, impact.workaround,
                        feature.calls, list(feature.phases)))
    order = {"blocker": 0, "degraded": 1, "benign": 2}
    return sorted(gaps, key=lambda g: (order[g.severity], g.feature))


def gaps_json(gaps: list[Gap], profile: KernelProfile, filesystem: str) -> str:
    return json.dumps({"kernel": profile.name, "evidence": profile.evidence, "filesystem": filesystem,
                       "gaps": [asdict(g) for g in gaps]}, indent=1)
