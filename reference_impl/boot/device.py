"""Where a filesystem lives (image/device, byte offset, GPT partition) and the ``root=`` it yields.

``root=`` follows blsforme: a filesystem in a GPT partition → ``root=PARTUUID=<partition guid>``; btrfs →
``root=UUID=<fsid> rootflags=subvol=<subvol>``; LUKS → ``rd.luks.uuid=<uuid>``; otherwise
``root=UUID=<fs uuid>``.

For btrfs the mount options of the root go in ``rootflags=``: the parameter the kernel reads for the root it
mounts itself (Documentation/admin-guide/kernel-parameters.txt) and that systemd-fstab-generator and dracut read
for ``/sysroot`` (systemd.kernel-command-line(7), dracut.cmdline(7)).  blsforme writes ``rootfsflags=``
(aerynOS/blsforme#70), which nothing reads: the subvolume would be ignored and the default one mounted.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from reference_impl.boot.gpt import GptDisk, Partition, has_gpt, read_gpt
from reference_impl.boot.superblock import FsInfo, probe
from stonelab.errors import StonelabError


@dataclass(frozen=True)
class Volume:
    """A filesystem location: ``path`` (image or block device), byte ``offset``, ``size`` (0 = to the end)."""
    path: str
    offset: int = 0
    size: int = 0
    partition: Partition | None = None

    def describe(self) -> str:
        if self.partition is not None:
            return f"{self.path} partition {self.partition.number}"
        return self.path


def root_argument(fs: FsInfo | None, partition: Partition | None, subvol: str | None = None) -> str | None:
    """The ``root=`` words booting ``fs`` (None for no filesystem): see the module's docstring.  A btrfs
    subvolume with blanks is quoted as the kernel and systemd read it (``rootflags="subvol=/my root"``); one
    with a comma or a double quote cannot be named there (mount options are comma-separated, the command line
    has no escape for ``"``): StonelabError."""
    if fs is None:
        return None
    if fs.type == "crypto_LUKS":
        return f"rd.luks.uuid={fs.uuid}"
    if fs.type == "btrfs":
        subvol = subvol or "/"
        if "," in subvol or '"' in subvol or "\n" in subvol:
            raise StonelabError(f"btrfs subvolume {subvol!r} cannot be named in rootflags=subvol= (a comma splits "
                                f"mount options, a quote or newline ends the command line word): rename it")
        flags = f"subvol={subvol}"
        return f"root=UUID={fs.uuid} " + (f'rootflags="{flags}"' if any(c.isspace() for c in flags)
                                          else f"rootflags={flags}")
    if partition is not None:
        return f"root=PARTUUID={partition.part_guid}"
    return f"root=UUID={fs.uuid}"


def check_disk_path(path: str | os.PathLike[str]) -> None:
    """Refuse, in one line, a path that is neither a disk image (regular file) nor a block device: a FIFO would
    block the first read for ever, a character device (``/dev/zero``) has no end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise StonelabError(f"{path}: {err.strerror or err}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise StonelabError(f"{path}: neither a disk image nor a block device")


def parse_volume_spec(spec: str) -> Volume:
    """``IMG_OR_DEV`` or ``IMG_OR_DEV:PARTNUM`` (partition number in the image's GPT)."""
    path, number = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, _, tail = spec.rpartition(":")
        if not tail.isdigit():
            raise StonelabError(f"{spec}: not a file, and {tail!r} is not a partition number")
        number = int(tail)
    if not os.path.exists(path):
        raise StonelabError(f"{path}: no such disk image or device")
    check_disk_path(path)
    if number is None:
        return Volume(path)
    part = read_gpt(path).partition(number)
    return Volume(path, part.offset, part.size, part)


def probe_volume(volume: Volume) -> FsInfo | None:
    try:
        return probe(volume.path, volume.offset)
    except OSError as err:
        raise StonelabError(f"{volume.describe()}: cannot read: {err.strerror or err}") from err


@dataclass(frozen=True)
class PartitionReport:
    partition: Partition
    fs: FsInfo | None
    root: str | None


def probe_disk(disk: GptDisk) -> list[PartitionReport]:
    reports = []
    for part in disk.partitions:
        fs = probe_volume(Volume(disk.path, part.offset, part.size, part))
        reports.append(PartitionReport(part, fs, root_argument(fs, part)))
    return reports


# -- a running system: /proc/self/mountinfo + sysfs ----------------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    mount_point: str
    root: str            # the subtree of the filesystem mounted there
    major_minor: str
    fstype: str
    source: str
    super_options: str


_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mountinfo field with the kernel's octal escapes (``\\040`` for a blank, ``seq_escape()``) undone; bytes
    that are not escapes (UTF-8 names) are kept as they are."""
    if "\\" not in field:
        return field
    raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def read_mountinfo(path: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    mounts = []
    for line in path.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(Mount(_unescape(fields[4]), _unescape(fields[3]), fields[2], tail[0], tail[1], tail[2]))
    return mounts


def mount_of(target: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``target`` (longest mount-point prefix; later mounts shadow earlier ones)."""
    target_s = str(Path(os.path.realpath(target)))
    best: Mount | None = None
    for mount in mounts:
        mp = mount.mount_point
        if target_s == mp or target_s.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = mount
    return best


def volume_of_mount(mount: Mount, sysfs: Path = Path("/sys")) -> Volume:
    """The block device (and GPT partition) behind a mounted filesystem, from sysfs.  btrfs reports an anonymous
    device number (0:N) for every mount; its device is then the mount's source."""
    dev = sysfs / "dev" / "block" / mount.major_minor
    if not dev.exists() and mount.source.startswith("/dev/"):
        try:
            source = os.stat(mount.source)
            rdev = source.st_rdev if stat.S_ISBLK(source.st_mode) else None
        except OSError:
            rdev = None
        if rdev is not None:
            dev = sysfs / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    if not dev.exists():
        raise StonelabError(f"{mount.mount_point}: filesystem {mount.fstype} on {mount.source} is not on a "
                            f"block device (pass --root-device)")
    name = os.path.basename(os.path.realpath(dev))
    node = f"/dev/{name}"
    part_file = dev / "partition"
    if not part_file.exists():
        return Volume(node)
    number = int(part_file.read_text().strip())
    parent = os.path.basename(os.path.dirname(os.path.realpath(dev)))
    disk_node = f"/dev/{parent}"
    if has_gpt(disk_node):
        part = read_gpt(disk_node).partition(number)
        return Volume(node, 0, part.size, part)
    return Volume(node)


def subvol_of(mount: Mount) -> str | None:
    for option in mount.super_options.split(","):
        if option.startswith("subvol="):
            return _unescape(option[len("subvol="):])
    return None


BTRFS_SUBVOLUME_INODE = 256   # BTRFS_FIRST_FREE_OBJECTID: the inode number of every subvolume's top directory


def root_subvolume(root: Path, mount: Mount) -> str | None:
    """The btrfs subvolume ``root`` is, as ``subvol=`` names it: the mount's own, or, for a subvolume below the
    mount point (``/@`` mounted, root at ``<mnt>/nested``), the mount's joined with the path below it.  Raises
    StonelabError when ``root`` is a plain directory inside a subvolume: the kernel mounts only a subvolume as
    the root, so no ``rootflags=`` boots it."""
    base = subvol_of(mount)
    real = os.path.realpath(root)
    below = os.path.relpath(real, mount.mount_point)
    if below == ".":
        return base
    try:
        inode = os.stat(real).st_ino
    except OSError as err:
        raise StonelabError(f"{root}: cannot read: {err.strerror or err}") from err
    if inode != BTRFS_SUBVOLUME_INODE:
        raise StonelabError(f"{root}: a directory inside btrfs subvolume {base or '/'} mounted at "
                            f"{mount.mount_point}, not a subvolume of its own: no rootflags=subvol= boots it "
                            f"(make it a subvolume, or pass --root-device)")
    return (base or "/").rstrip("/") + "/" + below


def root_argument_for_path(root: Path, mountinfo: Path = Path("/proc/self/mountinfo"),
                           sysfs: Path = Path("/sys")) -> str:
    mount = mount_of(root, read_mountinfo(mountinfo))
    if mount is None:
        raise StonelabError(f"{root}: no mount found in {mountinfo} (pass --root-device)")
    volume = volume_of_mount(mount, sysfs)
    try:
        fs = probe_volume(volume)
    except StonelabError as err:
        raise StonelabError(f"{err} (pass --root-device DEV_OR_IMG[:PARTNUM])") from err
    subvol = root_subvolume(root, mount) if fs is not None and fs.type == "btrfs" else None
    arg = root_argument(fs, volume.partition, subvol)
    if arg is None:
        raise StonelabError(f"{volume.describe()}: no known filesystem superblock, cannot derive root= "
                            f"(pass --root-device)")
    return arg


SUBVOL_SUFFIX = ":subvol="


def root_argument_for_spec(spec: str, subvol: str | None = None) -> str:
    """``root=`` for ``DEV_OR_IMG[:PARTNUM][:subvol=PATH]`` (``--root-device``): the subvolume of a btrfs root
    given in the spec (or as ``subvol``; default ``/``).  A subvolume for a filesystem that is not btrfs is a
    one-line StonelabError, not silently dropped."""
    if SUBVOL_SUFFIX in spec and not os.path.exists(spec):
        spec, _, given = spec.partition(SUBVOL_SUFFIX)
        subvol = subvol or given
    volume = parse_volume_spec(spec)
    fs = probe_volume(volume)
    if subvol and fs is not None and fs.type != "btrfs":
        raise StonelabError(f"{volume.describe()}: subvol={subvol} given, but the filesystem is {fs.type}, "
                            f"not btrfs: it has no subvolumes")
    arg = root_argument(fs, volume.partition, subvol)
    if arg is None:
        raise StonelabError(f"{volume.describe()}: no known filesystem superblock, cannot derive root=")
    return arg
