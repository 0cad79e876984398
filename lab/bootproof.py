"""Proof in a real boot that every state is bootable and every rollback reachable from the boot menu.

A system disk is made with the reference implementation itself: a kernel package (the host's kernel plus a
small initramfs carrying ``stonelab-fstx.sh``) and two versions of an application, installed as two states
into a root directory, which becomes the ext4 partition of a GPT disk (``mkfs.ext4 -d``: no loop mount, hard
links kept); ``stonelab boot sync`` writes systemd-boot and one Type 1 entry per state to the FAT ESP through
mtools.  Booted through OVMF → systemd-boot → an entry, the initramfs mounts the root, lets the fstx script
honour ``moss.fstx=<id>`` and prints ``STONELAB-BOOTED state=<id>`` from ``/usr/.stateID``.
"""
from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from reference_impl.stone import PackageSpec, build_package_from_files
from stonelab.errors import StonelabError
from vm.disk import DiskLayout, build_disk
from vm.host import Kernel
from vm.initramfs import module_files, write_busybox_initramfs

FSTX_SCRIPT = Path(__file__).resolve().parents[1] / "reference_impl" / "boot" / "initrd" / "stonelab-fstx.sh"
BOOTED = re.compile(r"STONELAB-BOOTED state=(\S*) fstx=(\S*)")
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
APPLETS = ("sh", "mount", "umount", "cat", "echo", "insmod", "mkdir", "ln", "mv", "rm", "rmdir", "readlink",
           "sleep", "poweroff", "sync", "tr", "ls", "test", "[", "cut", "sed", "grep", "head", "sort", "basename")
INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /mod/*.ko; do [ -e "$m" ] && insmod "$m"; done
i=0; while [ ! -b /dev/vda2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /sysroot
mount -t ext4 /dev/vda2 /sysroot || { echo "STONELAB-BOOT-FAILED mount"; poweroff -f; }
fstx=""; for w in $(cat /proc/cmdline); do case "$w" in moss.fstx=*) fstx=${w#moss.fstx=};; esac; done
sh /stonelab-fstx.sh || echo "STONELAB-BOOT-FAILED fstx"
echo "STONELAB-BOOTED state=$(cat /sysroot/usr/.stateID 2>/dev/null) fstx=$fstx"
sync
umount /sysroot
poweroff -f
"""


def system_initrd(kernel: Kernel) -> bytes:
    """busybox, the modules to reach an ext4 root on virtio, the fstx script and an init that reports."""
    if not FSTX_SCRIPT.is_file():
        raise StonelabError(f"{FSTX_SCRIPT}: the initramfs fstx script is missing")
    buffer = io.BytesIO()
    write_busybox_initramfs(buffer, INIT, module_files(kernel, INITRD_MODULES), applets=APPLETS,
                            directories=("bin", "dev", "proc", "sys", "mod", "sysroot"),
                            files={"stonelab-fstx.sh": (FSTX_SCRIPT.read_bytes(), 0o755)})
    return buffer.getvalue()


def kernel_package(out: Path, kernel: Kernel, initrd: bytes) -> Path:
    """``linux``: ``usr/lib/kernel/<kver>/vmlinuz`` and ``10-stonelab.initrd``, as AerynOS kernels ship."""
    kdir = f"lib/kernel/{kernel.release}"
    files = {f"{kdir}/vmlinuz": kernel.image.read_bytes(), f"{kdir}/10-stonelab.initrd": initrd,
             "lib/kernel/cmdline.d/00-console.cmdline": "console=ttyS0 panic=-1\n"}
    spec = PackageSpec(name="linux", version=kernel.release.split("-")[0] or "1", release=1,
                       summary="the lab guest's kernel", license=["GPL-2.0-only"])
    return build_package_from_files(files, spec, out / "linux.stone", level=3)


def app_package(out: Path, version: int) -> Path:
    spec = PackageSpec(name="hello", version=str(version), release=version, summary="hello", license=["MPL-2.0"])
    return build_package_from_files({"share/hello/VERSION": f"{version}\n"}, spec, out / f"hello-{version}.stone",
                                    level=3)


@dataclass
class SystemDisk:
    path: Path
    root: Path  # the host-side copy of the installed root
    layout: DiskLayout

    @property
    def esp(self) -> str:
        return f"{self.path}:1"

    @property
    def root_device(self) -> str:
        return f"{self.path}:2"


def stonelab(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise StonelabError(f"stonelab {' '.join(args)}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def make_system_disk(workdir: Path, kernel: Kernel, states: int = 2) -> SystemDisk:
    """Install ``states`` states with the reference implementation and make them a bootable GPT disk."""
    packages = workdir / "packages"
    linux = kernel_package(packages, kernel, system_initrd(kernel))
    root = workdir / "root"
    root.mkdir(parents=True)
    stonelab("install", "-D", str(root), "--swap", "exchange", str(linux), str(app_package(packages, 1)))
    for version in range(2, states + 1):
        stonelab("install", "-D", str(root), "--swap", "exchange", str(app_package(packages, version)))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    layout = DiskLayout(esp_mib=64, root_mib=max(64, size * 3 // (1 << 20) + 32))
    disk = build_disk(workdir / "system.img", layout, root_tree=root)
    system = SystemDisk(disk.path, root, layout)
    stonelab("boot", "sync", "-D", str(root), "--esp", system.esp, "--root-device", system.root_device)
    return system


def booted_state(console: str) -> tuple[str, str] | None:
    """(state id from /usr/.stateID, moss.fstx of the entry) of the last boot in a console log."""
    found = BOOTED.findall(console)
    return found[-1] if found else None
