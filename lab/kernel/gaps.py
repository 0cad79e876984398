"""Gaps between what the reference implementation needs (the traced requirements, plus the needs a trace cannot
show) and what a kernel profile says the kernel does, each with its consequence for an AerynOS-style system, the
workaround, and the profile's evidence — what a porter needs to know."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from lab.kernel.profile import KernelProfile, Result, flags_of
from lab.kernel.trace import Trace


@dataclass(frozen=True)
class Impact:
    consequence: str
    workaround: str
    severity: str  # blocker | degraded | benign
    workaround_id: str = ""  # what the lab can verify (see lab/kernel/report.py): "" when nothing to verify


# What a feature's absence (or wrong semantics) means, for upstream moss and for the reference.  Keys are profile
# feature keys; a requirement with several flags is judged by each flag's entry (see impact_for).
IMPACTS: dict[str, Impact] = {
    "renameat2:RENAME_EXCHANGE": Impact(
        "the atomic /usr swap fails: upstream moss aborts every install, remove and rollback after the blit "
        "(staging left behind, moss #576)",
        "swap with a /usr symlink replaced by rename(2): `--swap symlink` (the reference chooses it by itself when "
        "its probe sees the refusal); or a kernel patch implementing RENAME_EXCHANGE on ext2 (PR #3579 was closed)",
        "blocker", "swap-symlink"),
    "renameat2:RENAME_NOREPLACE": Impact("no-clobber renames are unavailable", "link + unlink", "benign"),
    "rename": Impact("neither swap strategy can switch /usr atomically; old trees cannot be archived",
                     "none short of a kernel fix", "blocker"),
    "linkat": Impact("the blit cannot hard-link from the store", "`--blit copy` (full copies: slower, more disk)",
                     "degraded", "blit-copy"),
    "linkat:AT_EMPTY_PATH": Impact("upstream moss's blit links open fds by name and fails",
                                   "link by path (the reference does)", "degraded"),
    "symlinkat": Impact("symlinks in packages and root links cannot be created", "none", "blocker"),
    "symlink": Impact("root links (/bin, /lib, …) and the symlink swap cannot be made", "none", "blocker"),
    "mkdirat": Impact("the blit cannot build directories", "none", "blocker"),
    "fchmod": Impact("file modes cannot be applied", "none", "blocker"),
    "fchown": Impact("file owners cannot be applied", "ownership ignored (files owned by root)", "degraded"),
    "openat:O_CREAT|O_EXCL": Impact("fresh empty files and the lock file can clobber existing ones",
                                    "none", "blocker"),
    "openat:O_NOFOLLOW": Impact("a hostile symlink in a tree can redirect writes", "none", "degraded"),
    "openat:O_TMPFILE": Impact(
        "extraction cannot write assets as unnamed O_TMPFILE inodes; it falls back to `.part` + rename (one more "
        "directory update per file; a crash can leave `.part` files, which the store's verification removes)",
        "none needed: the fallback is automatic and crash-safe", "benign", "tmpfile-fallback"),
    "openat:O_SYNC": Impact("O_SYNC writes are not synchronous: only explicit fsync/syncfs make data durable",
                            "the reference never relies on O_SYNC (explicit fsync/syncfs)", "benign"),
    "ioctl:FICLONE": Impact("no reflinks: the reflink probe fails", "hard links (the default fallback)", "benign"),
    "copy_file_range": Impact(
        "copies (the EXDEV fallback, `--blit copy`, mode/owner variants) cannot use copy_file_range",
        "none needed: the blit falls back to sendfile(2) by itself", "benign", "blit-copy"),
    "sendfile": Impact("copy fallback unavailable", "read/write loop", "benign"),
    "syncfs": Impact(
        "the reference cannot make a staged tree durable in one call before its intent record: a power cut after "
        "'success' may lose or tear the transaction", "fsync every file and directory written (slower)", "degraded"),
    "fsync": Impact(
        "fsync does not make a new file's allocation durable (bitmaps, group descriptors): after a power cut the "
        "blocks of an fsynced file can be marked free and reused",
        "syncfs (the reference issues one before the intent record and after the swap)", "degraded", "syncfs"),
    "fdatasync": Impact("SQLite commits (fdatasync) are not fully durable: allocation metadata can be lost",
                        "syncfs after the database commit (the reference's transaction boundary)", "degraded", "syncfs"),
    "fsync:directory": Impact("a rename made durable by a directory fsync may not survive a power cut",
                              "syncfs after each rename", "degraded", "syncfs"),
    "flock:LOCK_EX|LOCK_NB": Impact("two package managers can run at once and corrupt the installation",
                                    "fcntl(F_SETLK) locks", "degraded"),
    "prlimit64:RLIMIT_NOFILE": Impact("wide trees may hit EMFILE (moss #841)", "the blit uses few fds", "benign"),
    "setxattr": Impact("xattrs (security.capability on binaries) cannot be restored", "none", "degraded"),
    "unshare:CLONE_NEWNS": Impact("transaction triggers cannot be sandboxed", "`--no-triggers`", "blocker"),
    "unshare:CLONE_NEWUTS": Impact("the trigger sandbox cannot have its own hostname", "share the UTS namespace",
                                   "benign"),
    "unshare:CLONE_NEWIPC": Impact("the trigger sandbox shares SysV IPC with the host", "share it", "benign"),
    "unshare:CLONE_NEWPID": Impact(
        "triggers cannot get their own PID namespace: upstream moss's container (clone with NEWPID|NEWNS|NEWIPC|"
        "NEWUTS[|NEWNET][|NEWUSER]) fails with EINVAL, so every transaction with a trigger fails",
        "the reference falls back to mount+UTS+IPC namespaces (it says so): /etc read-only and the host root out of "
        "reach, but triggers see host processes; upstream moss needs a patched container", "blocker",
        "trigger-fallback"),
    "unshare:CLONE_NEWNET": Impact("triggers cannot be cut off the network (upstream moss's container fails)",
                                   "the reference's fallback runs them in the host network namespace", "blocker",
                                   "trigger-fallback"),
    "unshare:CLONE_NEWUSER": Impact(
        "upstream moss's container maps users in a user namespace and cannot start", "run triggers as real root in "
        "mount+UTS+IPC namespaces (the reference's sandbox needs no user namespace)", "blocker", "trigger-fallback"),
    "clone:CLONE_NEWPID": Impact("as unshare CLONE_NEWPID", "as unshare", "blocker", "trigger-fallback"),
    "clone:CLONE_NEWNET": Impact("as unshare CLONE_NEWNET", "as unshare", "blocker", "trigger-fallback"),
    "clone:CLONE_NEWUSER": Impact("as unshare CLONE_NEWUSER", "as unshare", "blocker", "trigger-fallback"),
    "open_tree": Impact("upstream moss's container bind-mounts with open_tree + move_mount and fails (ENOSYS)",
                        "mount(2) with MS_BIND (the reference's sandbox)", "blocker", "trigger-fallback"),
    "mount_setattr": Impact("upstream moss cannot make its read-only binds (MOUNT_ATTR_RDONLY)",
                            "mount(2) MS_REMOUNT|MS_BIND|MS_RDONLY (the reference's sandbox)", "blocker",
                            "trigger-fallback"),
    "mount:MS_PRIVATE|MS_REC": Impact("trigger mounts would leak into the host namespace", "none", "degraded"),
    "mount:MS_BIND": Impact("triggers cannot see the staged /usr", "`--no-triggers`", "degraded"),
    "mount:MS_BIND|MS_RDONLY|MS_REMOUNT": Impact("/etc cannot be made read-only for triggers",
                                                 "trust triggers not to write /etc", "degraded"),
    "pivot_root": Impact("the trigger sandbox cannot switch root", "chroot only (weaker)", "degraded"),
    "chroot": Impact("triggers cannot run in the isolation root", "`--no-triggers`", "degraded"),
    "mount:vfat": Impact(
        "the ESP (FAT) cannot be mounted: boot entries cannot be written from the running system; upstream "
        "(blsforme) reports success having written nothing when it finds no ESP",
        "write the ESP without mounting it: `--esp DEVICE` (the reference writes FAT through mtools), or leave the "
        "ESP to GRUB/firmware as Asterinas NixOS does", "blocker", "esp-mtools"),
    "sysfs:block": Impact(
        "ESP discovery and the root= derivation read /sys/dev/block (blsforme also /sys/class/block and "
        "/dev/block): boot sync cannot find the ESP or the root partition",
        "pass `--esp DEVICE` and `--root-device DEVICE:N` explicitly (the GPT is read from the device itself)",
        "degraded", "esp-mtools"),
    "durability": Impact(
        "the root filesystem has no journal: a power cut mid-update needs fsck, and Asterinas bug #3828 (group "
        "descriptors drift from the block bitmap after `sync; poweroff`, EIO on allocation after reboot) means "
        "even sync before power-off is not sufficient",
        "none complete: syncfs at each transaction boundary (the reference), `e2fsck -fy` of the root before it "
        "is mounted read-write at every boot, and a kernel fix for #3828", "blocker", "syncfs"),
    "writeback": Impact(
        "nothing written without an explicit sync ever reaches the disk: upstream moss (no fsync at all) loses "
        "whole transactions on a power cut, however long ago they finished",
        "the reference's syncfs/fsync points", "blocker", "syncfs"),
    "reboot:sync": Impact(
        "reboot(2) powers off without syncing: `reboot -f` or a kernel-initiated power-off loses what was not "
        "synced", "sync before reboot (busybox and systemd do); the reference syncs at every transaction boundary",
        "blocker", "syncfs"),
    "mount:ext4": Impact("the root cannot be ext4 (no driver): no journal", "an ext2 root (see durability)",
                         "degraded"),
    "rseq": Impact("glibc registers restartable sequences at every thread start",
                   "none needed: glibc treats ENOSYS as 'not available'", "benign"),
}

# Needs no trace of the reference can show, each with where it comes from.
EXTRA_NEEDS = {
    "mount:vfat": "boot: the ESP is a FAT filesystem (blsforme mounts it as vfat; the lab mounted it for the trace)",
    "durability": "every transaction: what is synced must survive a power cut",
    "writeback": "every transaction: upstream moss never calls fsync/syncfs (os-tools ffff7d4b)",
    "reboot:sync": "every boot: what the system wrote must reach the disk before power-off",
    "unshare:CLONE_NEWUSER": "upstream moss's trigger container (os-tools crates/container)",
    "clone:CLONE_NEWPID": "upstream moss's trigger container (os-tools crates/container)",
    "open_tree": "upstream moss's trigger container (os-tools crates/container: bind_mount)",
    "mount_setattr": "upstream moss's trigger container (os-tools crates/container: read-only binds)",
}


@dataclass
class Gap:
    """One requirement the kernel does not meet: ``result`` is the short form (ERRNO or wrong-semantics)."""

    feature: str
    result: str
    evidence: str  # probed | documented, plus what was seen
    source: list[str]
    severity: str
    consequence: str
    workaround: str
    workaround_id: str
    origin: str  # traced: phases… | needed: why
    phases: list[str] = field(default_factory=list)


def impact_for(key: str, profile: KernelProfile, filesystem: str) -> tuple[str, Impact | None]:
    """The profile key that fails for requirement ``key`` and its Impact (exact key first, then the flags)."""
    if key in IMPACTS:
        return key, IMPACTS[key]
    syscall, flags = flags_of(key)
    for other, impact in IMPACTS.items():
        other_call, other_flags = flags_of(other)
        if other_call == syscall and other_flags and other_flags <= flags:
            result = profile.exact(other, filesystem)
            if result is not None and not result.ok:
                return other, impact
    return key, None


def _needs(trace: Trace, profile: KernelProfile, filesystem: str) -> list[tuple[str, str, list[str]]]:
    needs = []
    for feature in trace.features:
        result = profile.result(feature.key, filesystem)
        if feature.category == "transaction" or (result is not None and result.errno == "ENOSYS"):
            needs.append((feature.key, "traced", list(feature.phases)))
    known = {key for key, _, _ in needs}
    needs += [(key, f"needed: {why}", []) for key, why in EXTRA_NEEDS.items() if key not in known]
    return needs


def analyse(trace: Trace, profile: KernelProfile, filesystem: str) -> list[Gap]:
    """Every requirement judged on ``filesystem``: the gaps, blockers first."""
    gaps = []
    for key, origin, phases in _needs(trace, profile, filesystem):
        result: Result | None = profile.result(key, filesystem)
        if result is None or result.ok:
            continue
        failing, impact = impact_for(key, profile, filesystem)
        impact = impact or Impact(f"{key} fails with {result.short()}: the calls the reference makes there "
                                  f"({', '.join(phases[:3]) or origin}) fail", "unknown: needs investigation",
                                  "degraded")
        evidence = f"{profile.evidence}: {result.evidence}" if result.evidence else profile.evidence
        if failing != key:
            evidence = f"{failing} → {result.short()}; {evidence}"
        gaps.append(Gap(key, result.short(), evidence, list(result.source), impact.severity, impact.consequence,
                        impact.workaround, impact.workaround_id, origin, phases))
    order = {"blocker": 0, "degraded": 1, "benign": 2}
    return sorted(gaps, key=lambda g: (order[g.severity], g.feature))


def gaps_json(gaps: list[Gap], profile: KernelProfile, filesystem: str) -> str:
    return json.dumps({"kernel": profile.name, "evidence": profile.evidence, "filesystem": filesystem,
                       "gaps": [asdict(g) for g in gaps]}, indent=1)
