"""root= rules, mountinfo parsing, and the vfat check of a mounted ESP (from a given mountinfo file)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impl.boot.device import (Volume, mount_of, probe_volume, read_mountinfo, root_argument,
                                        root_argument_for_path, subvol_of)
from reference_impl.boot.esp import DirectoryEsp, EspMissingError, EspNotFatError
from reference_impl.boot.gpt import Partition
from reference_impl.boot.superblock import FsInfo
from stonelab.errors import StonelabError
from tests.conftest import REPO

PART = Partition(2, "0fc63daf-8483-4772-8e79-3d69d8477de4", "6b1c3e1c-1111-4a2b-9c3d-0123456789ab", "root",
                 2048, 4095, 0, 512)


@pytest.mark.parametrize("fs, part, subvol, expected", [
    (FsInfo("ext4", "u-1", ""), PART, None, f"root=PARTUUID={PART.part_guid}"),
    (FsInfo("xfs", "u-2", ""), PART, None, f"root=PARTUUID={PART.part_guid}"),
    (FsInfo("f2fs", "u-3", ""), PART, None, f"root=PARTUUID={PART.part_guid}"),
    (FsInfo("ext4", "u-4", ""), None, None, "root=UUID=u-4"),
    (FsInfo("btrfs", "u-5", ""), PART, "/@root", "root=UUID=u-5 rootflags=subvol=/@root"),
    (FsInfo("btrfs", "u-6", ""), None, None, "root=UUID=u-6 rootflags=subvol=/"),
    (FsInfo("crypto_LUKS", "u-7", "", "2"), PART, None, "rd.luks.uuid=u-7"),
    (None, PART, None, None),
])
def test_root_argument_rules(fs: FsInfo | None, part: Partition | None, subvol: str | None,
                             expected: str | None) -> None:
    assert root_argument(fs, part, subvol) == expected


MOUNTINFO = """\
22 1 259:2 / / rw,relatime shared:1 - btrfs /dev/nvme0n1p2 rw,ssd,space_cache=v2,subvolid=256,subvol=/@root
23 22 259:1 / {esp} rw,relatime shared:2 - vfat /dev/nvme0n1p1 rw,fmask=0077,dmask=0077
24 22 0:30 / {other} rw - tmpfs tmpfs rw
25 22 0:31 / /with\\040space rw - ext4 /dev/sdb1 rw
"""


def test_mountinfo_parsing_and_lookup(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.format(esp=tmp_path / "efi", other=tmp_path / "tmp"))
    mounts = read_mountinfo(info)
    assert [m.mount_point for m in mounts][-1] == "/with space"
    assert subvol_of(mounts[0]) == "/@root" and subvol_of(mounts[1]) is None
    (tmp_path / "efi" / "EFI").mkdir(parents=True)
    assert mount_of(tmp_path / "efi" / "EFI", mounts).fstype == "vfat"
    assert mount_of(Path("/usr"), mounts).fstype == "btrfs"


def test_directory_esp_vfat_check_uses_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.format(esp=tmp_path / "efi", other=tmp_path / "tmp"))
    (tmp_path / "efi").mkdir()
    (tmp_path / "tmp").mkdir()
    DirectoryEsp(tmp_path / "efi", mountinfo=info).check()
    with pytest.raises(EspNotFatError, match=r"is on tmpfs"):
        DirectoryEsp(tmp_path / "tmp", mountinfo=info).check()
    with pytest.raises(EspMissingError, match="no such directory"):
        DirectoryEsp(tmp_path / "absent", mountinfo=info).check()


def test_root_not_on_a_block_device_is_one_line(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.format(esp=tmp_path / "efi", other=tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(StonelabError, match="not on a block device") as err:
        root_argument_for_path(tmp_path / "tmp", mountinfo=info, sysfs=tmp_path / "nosys")
    assert "\n" not in str(err.value)


def test_discovery_prefers_a_vfat_mount_at_boot(tmp_path: Path) -> None:
    from reference_impl.boot import DirectoryEsp, sync_boot
    from reference_impl.boot.sync import discover_esp
    from tests.test_boot_helpers import make_root

    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1)
    (root / "boot").mkdir()
    (root / "efi").mkdir()
    info = tmp_path / "mountinfo"
    info.write_text(f"22 1 259:2 / / rw - ext4 /dev/vda2 rw\n"
                    f"30 22 0:40 / {root / 'efi'} rw - tmpfs tmpfs rw\n"
                    f"31 22 259:1 / {root / 'boot'} rw - vfat /dev/vda1 rw\n")
    location = discover_esp(root, mountinfo=info)
    assert isinstance(location.target, DirectoryEsp) and location.target.root == root / "boot"
    report = sync_boot(root, esp=location.target, root_arg="root=PARTUUID=x",
                       bootloader=Path(__file__))
    assert (root / "boot" / "loader" / "entries" / "aerynos-6.6.1-1.conf").is_file()
    assert report.default_entry == "aerynos-6.6.1-1.conf"
    info.write_text(info.read_text().replace(" vfat ", " ext4 "))
    with pytest.raises(StonelabError):
        discover_esp(root, mountinfo=info, sysfs=tmp_path / "nosys")


def test_btrfs_subvolumes_that_need_quoting_or_cannot_be_named() -> None:
    btrfs = FsInfo("btrfs", "u", "")
    assert root_argument(btrfs, None, "/my root") == 'root=UUID=u rootflags="subvol=/my root"'
    assert root_argument(btrfs, PART, "/@/nested") == "root=UUID=u rootflags=subvol=/@/nested"
    for name in ("/a,b", '/a"b'):
        with pytest.raises(StonelabError, match="cannot be named in rootflags=subvol="):
            root_argument(btrfs, None, name)
    assert root_argument(FsInfo("ext4", "u", ""), None, "/@") == "root=UUID=u"        # no subvol off btrfs
    assert root_argument(FsInfo("f2fs", "u", ""), PART, "/@") == f"root=PARTUUID={PART.part_guid}"


def test_mountinfo_escapes_in_super_options_and_utf8_mount_points(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("30 1 0:39 /my\\040root /mnt/\u00e9t\u00e9\\040x rw - btrfs /dev/vda2 "
                    "rw,subvolid=258,subvol=/my\\040root\\054x\n", encoding="utf-8")
    mount = read_mountinfo(info)[0]
    assert (mount.mount_point, mount.root, subvol_of(mount)) == ("/mnt/\u00e9t\u00e9 x", "/my root", "/my root,x")


def test_root_argument_of_btrfs_subvolumes_on_a_real_mount(tmp_path: Path) -> None:
    """A loop-mounted btrfs: its mounts have anonymous device numbers (0:N, no /sys/dev/block entry), the
    subvolume comes from the mount, below the mount point (nested subvolume), with a blank; a plain directory
    inside a subvolume is refused."""
    from tests.test_blit import btrfs_mount, mounted
    with btrfs_mount(tmp_path) as mnt:
        for sub in ("@", "@/nested", "my root"):
            subprocess.run(["btrfs", "subvolume", "create", str(mnt / sub)], check=True, capture_output=True)
        (mnt / "@" / "plain").mkdir()
        uuid = probe_volume(Volume(next(m.source for m in read_mountinfo(Path("/proc/self/mountinfo"))
                                        if m.mount_point == str(mnt)))).uuid
        assert root_argument_for_path(mnt) == f"root=UUID={uuid} rootflags=subvol=/"
        assert root_argument_for_path(mnt / "@") == f"root=UUID={uuid} rootflags=subvol=/@"
        assert root_argument_for_path(mnt / "@" / "nested") == f"root=UUID={uuid} rootflags=subvol=/@/nested"
        assert root_argument_for_path(mnt / "my root") == f'root=UUID={uuid} rootflags="subvol=/my root"'
        with pytest.raises(StonelabError, match="not a subvolume of its own"):
            root_argument_for_path(mnt / "@" / "plain")
        image = tmp_path / "btrfs.img"
        with mounted(tmp_path / "sub", "-t", "btrfs", "-o", "loop,subvol=/@", str(image)) as sub:
            assert root_argument_for_path(sub / "nested") == f"root=UUID={uuid} rootflags=subvol=/@/nested"


@pytest.mark.parametrize("argv", [["boot", "probe", "{fifo}"], ["boot", "probe", "/dev/zero"],
                                  ["inspect", "{fifo}"], ["inspect", "/dev/zero"],
                                  ["boot", "sync", "-D", "{tmp}", "--esp", "{fifo}", "--root-device", "/dev/zero"],
                                  ["boot", "status", "-D", "{tmp}", "--esp", "/dev/zero"]],
                         ids=["probe-fifo", "probe-zero", "inspect-fifo", "inspect-zero", "sync-fifo", "status-zero"])
def test_a_fifo_or_character_device_for_an_image_is_one_line_not_a_hang(tmp_path: Path, argv: list[str]) -> None:
    """A FIFO blocks its first open or read for ever and /dev/zero has no end: neither is a disk image or a
    package; one line, at once."""
    os.mkfifo(tmp_path / "fifo")
    args = [a.format(fifo=tmp_path / "fifo", tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-m", "stonelab.cli", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "neither a disk image nor a block device" in done.stderr or "not a regular file" in done.stderr
