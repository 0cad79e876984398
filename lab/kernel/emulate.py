"""Run a command on Linux as if on another kernel: a seccomp filter generated from a kernel profile.

``python -m lab.kernel.emulate --profile asterinas-0.18.1 [--fs ext2] -- CMD ARGS…`` installs the filter (through
libseccomp's maintained binding, pyseccomp) and execs CMD, which inherits it (``--plan FILE`` instead of
``--profile``: a plan resolved on the lab's side, which is how the VM target's guests run it):

* every x86-64 syscall Linux has and the profile's syscall table lacks returns ENOSYS;
* a flag the profile refuses returns the profile's errno when the flag bit is set (``renameat2`` with
  RENAME_EXCHANGE → EINVAL on ext2, ``unshare``/``clone`` with CLONE_NEWPID/NEWNET/NEWUSER → EINVAL, ``openat``
  with O_TMPFILE → EOPNOTSUPP, ``ioctl(FICLONE)`` → ENOTTY, ``mount`` with MS_SLAVE/MS_SHARED → EINVAL);
  ``clone3`` then returns ENOSYS, because seccomp cannot read the flags it takes in memory — glibc falls back to
  ``clone``, whose flags it can;
* with root, in a private mount namespace (nothing outside the command sees it): empty ``/sys/class/block``,
  ``/sys/dev/block`` and ``/sys/block`` when the profile has no sysfs block directories.

Periodic writeback is machine-wide, so it is never changed here: the VM target's guests always run without it
(``Plan.no_writeback`` says the profile needs that).

What neither can express is listed by ``not_emulated()`` (and in reports): a missing filesystem driver (``mount``'s
type is a string in memory), wrong semantics of a call that succeeds (ext2's fsync without bitmaps, #3828's
bitmap drift), the persistent root's on-disk format (the VM target formats it as the profile says instead).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.kernel.profile import KernelProfile, linux_syscall_numbers, load_profile
from stonelab.errors import StonelabError

CLONE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
               "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
               "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}


@dataclass(frozen=True)
class ArgRule:
    """Refuse ``syscall`` when argument ``arg`` has all bits of ``value`` (or equals it, ``exact``)."""

    syscall: str
    arg: int
    value: int
    exact: bool = False


# profile feature key → the seccomp rule that refuses it (values from the x86-64 Linux uapi headers)
FLAG_RULES: dict[str, ArgRule] = {
    "renameat2:RENAME_NOREPLACE": ArgRule("renameat2", 4, 1),
    "renameat2:RENAME_EXCHANGE": ArgRule("renameat2", 4, 2),
    "linkat:AT_EMPTY_PATH": ArgRule("linkat", 4, 0x1000),
    "openat:O_TMPFILE": ArgRule("openat", 2, 0o20200000),
    "ioctl:FICLONE": ArgRule("ioctl", 1, 0x40049409, exact=True),
    "mount:MS_SLAVE": ArgRule("mount", 3, 1 << 19),
    "mount:MS_SHARED": ArgRule("mount", 3, 1 << 20),
    **{f"unshare:{name}": ArgRule("unshare", 0, bit) for name, bit in CLONE_FLAGS.items()},
    **{f"clone:{name}": ArgRule("clone", 0, bit) for name, bit in CLONE_FLAGS.items()},
}
SYSFS_BLOCK_DIRS = ("/sys/class/block", "/sys/dev/block", "/sys/block")
# Why a refused or wrong feature is not (or otherwise) emulated; anything else: no seccomp rule expresses it.
OTHERWISE = {
    "mount:vfat": "mount's filesystem type is a string in the caller's memory, which seccomp cannot read: a vfat "
                  "mount still works under emulation",
    "mount:ext4": "as mount:vfat; the VM target formats the root as the profile's persistent root instead",
    "durability": "the VM target formats the root as the profile's persistent root (ext2: no journal) and its "
                  "power cuts lose what was not flushed; #3828's bitmap drift is not reproduced",
    "fsync": "a call that succeeds with weaker semantics cannot be filtered (ext2's fsync without bitmaps)",
    "fdatasync": "as fsync", "fsync:directory": "as fsync",
    "openat:O_SYNC": "an ignored flag cannot be filtered without refusing the call",
    "reboot:sync": "power-off is the lab's power cut (QEMU killed), which never syncs",
}


@dataclass(frozen=True)
class Plan:
    """What the filter does: ``enosys`` syscall names, ``flags`` (key, rule, errno name), and the rest."""

    enosys: tuple[str, ...]
    flags: tuple[tuple[str, ArgRule, str], ...]
    no_writeback: bool
    hide_sysfs_block: bool
    not_emulated: tuple[str, ...]

    def to_json(self) -> str:
        """The plan on its own (``--plan FILE``): a guest runs it without the profile, the kernel headers or
        ``../shared/data``, which only the lab's side has."""
        return json.dumps({"enosys": list(self.enosys), "flags": [[k, asdict(r), e] for k, r, e in self.flags],
                           "no_writeback": self.no_writeback, "hide_sysfs_block": self.hide_sysfs_block,
                           "not_emulated": list(self.not_emulated)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Plan:
        """Raises StonelabError (one line naming ``where``) for anything but :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
            return cls(tuple(data["enosys"]), tuple((k, ArgRule(**r), e) for k, r, e in data["flags"]),
                       bool(data["no_writeback"]), bool(data["hide_sysfs_block"]), tuple(data["not_emulated"]))
        except (ValueError, KeyError, TypeError) as err:
            raise StonelabError(f"{where}: not an emulation plan ({err})") from None


def plan(profile: KernelProfile, filesystem: str) -> Plan:
    """The emulation of ``profile`` on ``filesystem``: which syscalls, which flags, what is left out."""
    numbers = linux_syscall_numbers()
    enosys: list[str] = []
    if profile.syscalls is not None:
        enosys = sorted(name for name, number in numbers.items() if number not in profile.syscalls)
    flags = []
    for key, rule in FLAG_RULES.items():
        result = profile.exact(key, filesystem)
        if result is not None and result.status == "errno" and rule.syscall not in enosys:
            flags.append((key, rule, result.errno))
    if any(rule.syscall == "clone" for _, rule, _ in flags) and "clone3" not in enosys:
        enosys.append("clone3")
    left = []
    for key in sorted(profile.results):
        result = profile.exact(key, filesystem)
        if result is None or result.ok or key in FLAG_RULES or key in ("writeback", "sysfs:block"):
            continue
        if result.status == "errno" and (key.split(":")[0] in enosys):
            continue
        left.append(f"{key}: {result.short()} — {OTHERWISE.get(key, 'no seccomp rule expresses it')}")
    writeback = profile.exact("writeback", filesystem)
    sysfs = profile.exact("sysfs:block", filesystem)
    return Plan(tuple(sorted(enosys)), tuple(flags), bool(writeback and not writeback.ok),
                bool(sysfs and not sysfs.ok), tuple(left))


def install_filter(p: Plan) -> None:
    """Load the seccomp filter for ``p`` into this process (inherited by children and across exec).
    Raises StonelabError when libseccomp or pyseccomp is missing."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as err:
        raise StonelabError(f"seccomp emulation needs pyseccomp and libseccomp2 ({err})") from None
    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in p.enosys:
        try:
            filt.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
        except (RuntimeError, ValueError, OSError):
            continue  # a name this libseccomp does not know on x86-64 (a pseudo-syscall): nothing to refuse
    for _key, rule, errname in p.flags:
        code = getattr(errno, errname)
        arg = seccomp.Arg(rule.arg, seccomp.EQ, rule.value) if rule.exact else \
            seccomp.Arg(rule.arg, seccomp.MASKED_EQ, rule.value, rule.value)
        filt.add_rule(seccomp.ERRNO(code), rule.syscall, arg)
    filt.load()


def _apply_environment(p: Plan) -> list[str]:
    """Root only: the parts seccomp cannot do, confined to this process's new mount namespace."""
    applied: list[str] = []
    if os.geteuid() != 0:
        return applied
    if p.hide_sysfs_block:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_FLAGS["CLONE_NEWNS"]) == 0:
            libc.mount(None, b"/", None, ctypes.c_ulong((1 << 14) | (1 << 18)), None)  # MS_REC|MS_PRIVATE
            for directory in SYSFS_BLOCK_DIRS:
                if os.path.isdir(directory) and libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, None) == 0:
                    applied.append(f"{directory} empty")
    return applied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.kernel.emulate",
                                     description="run CMD under the seccomp emulation of a kernel profile")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="a kernel profile (name in compat/profiles or a path)")
    source.add_argument("--plan", type=Path, help="a plan written by Plan.to_json (what a guest runs)")
    parser.add_argument("--fs", help="filesystem whose results apply (default: the profile's persistent root)")
    parser.add_argument("--explain", action="store_true", help="print the plan and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.plan:
            try:
                p = Plan.from_json(args.plan.read_text(), str(args.plan))
            except OSError as err:
                raise StonelabError(f"{args.plan}: cannot read the emulation plan ({err.strerror})") from None
            title = str(args.plan)
        else:
            profile = load_profile(args.profile)
            filesystem = args.fs or profile.persistent_root or "*"
            p = plan(profile, filesystem)
            title = f"{profile.name} on {filesystem}"
        if args.explain:
            print(f"{title}: ENOSYS for {len(p.enosys)} syscalls; flags: "
                  + ", ".join(f"{k} → {e}" for k, _, e in p.flags))
            for line in p.not_emulated:
                print(f"not emulated: {line}")
            return 0
        if not command:
            raise StonelabError("emulate: no command given (… -- CMD ARGS)")
        _apply_environment(p)
        install_filter(p)
    except StonelabError as err:
        print(f"stonelab: error: {err}", file=sys.stderr)
        return 2
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"stonelab: error: {command[0]}: cannot run ({err.strerror})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
