"""System-under-test disks: a GPT image with a FAT32 ESP and an ext4 root, built without loop mounts
(``sfdisk``, ``mkfs.vfat --offset``, mtools, ``mkfs.ext4 -d -E offset=``). In the guest they are /dev/vda1 and
/dev/vda2 (virtio-blk)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reference_impl.boot.esp import fat32_sectors_per_cluster
from vm.errors import VmError
from vm.host import require_program

MIB = 1 << 20
SECTOR = 512
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MIN_ESP_MIB = 33  # FAT32 needs at least 65525 clusters


@dataclass(frozen=True)
class DiskLayout:
    esp_mib: int = 64
    root_mib: int = 512

    def __post_init__(self) -> None:
        if self.esp_mib < MIN_ESP_MIB:
            raise VmError(f"ESP size {self.esp_mib} MiB is too small for FAT32 (at least {MIN_ESP_MIB} MiB)")
        if self.root_mib < 8:
            raise VmError(f"root size {self.root_mib} MiB is too small for ext4 (at least 8 MiB)")

    @property
    def esp_offset(self) -> int:
        return MIB

    @property
    def root_offset(self) -> int:
        return MIB + self.esp_mib * MIB

    @property
    def total_bytes(self) -> int:
        return self.root_offset + self.root_mib * MIB + MIB  # 1 MiB tail for the backup GPT


@dataclass(frozen=True)
class DiskImage:
    path: Path
    layout: DiskLayout


def _run(argv: list[str], what: Path, env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, input=stdin,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise VmError(f"{what}: {Path(argv[0]).name} failed ({proc.returncode}): "
                      f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}")


def _tool(name: str, package: str) -> str:
    return require_program(name, package, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def build_disk(path: Path, layout: DiskLayout = DiskLayout(), esp_tree: Path | None = None,
               root_tree: Path | None = None, root_label: str = "sut-root", root_fs: str = "ext4") -> DiskImage:
    """Create ``path`` (replacing it) with the GPT layout and filesystems, filled from the given trees.
    ``root_fs`` is ``ext4`` or ``ext2`` (4 KiB blocks, no journal: what Asterinas mounts)."""
    if root_fs not in ("ext4", "ext2"):
        raise VmError(f"{path}: root filesystem {root_fs!r} is not ext4 or ext2")
    sfdisk = _tool("sfdisk", "fdisk")
    mkfs_vfat = _tool("mkfs.vfat", "dosfstools")
    mkfs_ext4 = _tool("mkfs.ext4", "e2fsprogs")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as image:
            image.truncate(layout.total_bytes)
        esp_start, root_start = layout.esp_offset // SECTOR, layout.root_offset // SECTOR
        script = (f"label: gpt\n"
                  f"start={esp_start}, size={layout.esp_mib * MIB // SECTOR}, type={ESP_TYPE}, name=ESP\n"
                  f"start={root_start}, size={layout.root_mib * MIB // SECTOR}, type={LINUX_FS_TYPE}, name=root\n")
        _run([sfdisk, "--quiet", "--no-reread", "--no-tell-kernel", str(tmp)], tmp, stdin=script)
        # an explicit cluster size: with --offset, mkfs.vfat sizes clusters for the whole image (see
        # fat32_sectors_per_cluster), which leaves a 64 MiB ESP too few clusters to be FAT32
        cluster = min(8, fat32_sectors_per_cluster(layout.esp_mib * MIB))
        _run([mkfs_vfat, "-F", "32", "-s", str(cluster), "-n", "ESP", "--offset", str(esp_start), str(tmp),
              str(layout.esp_mib * 1024)], tmp)
        if esp_tree is not None:
            copy_into_fat(tmp, layout.esp_offset, esp_tree)
        argv = [mkfs_ext4, "-q", "-F", "-L", root_label, "-E", f"offset={layout.root_offset}"]
        if root_fs == "ext2":
            argv += ["-t", "ext2", "-b", "4096"]
        if root_tree is not None:
            argv += ["-d", str(root_tree)]
        _run(argv + [str(tmp), f"{layout.root_mib * 1024}k"], tmp)
        if os.path.getsize(tmp) != layout.total_bytes:
            raise VmError(f"{tmp}: mkfs changed the image size (expected {layout.total_bytes} bytes)")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return DiskImage(path, layout)


def copy_into_fat(image: Path, offset: int, tree: Path) -> None:
    """Copy the content of ``tree`` into the FAT filesystem at ``offset`` of ``image`` with mtools."""
    mmd, mcopy = _tool("mmd", "mtools"), _tool("mcopy", "mtools")
    target = f"{image}@@{offset}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    for directory, dirnames, filenames in os.walk(tree):
        rel = Path(directory).relative_to(tree)
        for name in sorted(dirnames):
            _run([mmd, "-i", target, f"::/{rel / name}"], image, env)
        for name in sorted(filenames):
            _run([mcopy, "-i", target, "-o", str(Path(directory, name)), f"::/{rel / name}"], image, env)


def partition_table(path: Path) -> dict:
    """``sfdisk --json`` of ``path`` (the tests check the layout with it)."""
    import json

    proc = subprocess.run([_tool("sfdisk", "fdisk"), "--json", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VmError(f"{path}: sfdisk --json failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["partitiontable"]


def uefi_esp_tree(dest: Path, kernel_image: Path, initrd: Path, options: str, systemd_boot_efi: Path) -> Path:
    """An ESP tree booting ``kernel_image`` through systemd-boot with a Type 1 entry, no menu."""
    (dest / "EFI" / "BOOT").mkdir(parents=True, exist_ok=True)
    (dest / "loader" / "entries").mkdir(parents=True, exist_ok=True)
    (dest / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(systemd_boot_efi.read_bytes())
    (dest / "vmlinuz").write_bytes(kernel_image.read_bytes())
    (dest / "initrd").write_bytes(initrd.read_bytes())
    (dest / "loader" / "loader.conf").write_text("timeout 0\ndefault stonelab.conf\n")
    (dest / "loader" / "entries" / "stonelab.conf").write_text(
        f"title stonelab lab guest\nlinux /vmlinuz\ninitrd /initrd\noptions {options}\n")
    return dest
