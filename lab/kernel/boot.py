"""Boot any x86-64 kernel with the semantic probe and turn what it really did into a profile.

The lab makes one disk per filesystem (ext2 with 4 KiB blocks — the only kind Asterinas mounts — ext4 and FAT32,
in that order: /dev/vda, vdb, vdc; after the ESP's vda under UEFI), a busybox initramfs carrying the static probe and an init that runs it on a
tmpfs and on each disk (the probe mounts them itself, so a missing driver is reported as ``mount:<fs>`` ENODEV),
then reports the kernel-wide needs (sysfs block directories, periodic writeback) and powers off.  Boot protocols:

* ``linux``: QEMU direct boot of a bzImage (``-kernel``/``-initrd``/``-append``);
* ``multiboot``: QEMU direct boot of a multiboot v1 ELF (gunzipped first when it is gzip-compressed, as Debian
  ships Xen); the initramfs is the last module, after the user's ``--module``s — e.g. Xen with the Linux kernel as
  dom0, whose initramfs is then the probe's, so the probe runs in dom0 on the hypervisor;
* ``uefi``: OVMF → systemd-boot on an ESP disk (added last) → a Type 1 entry for an EFI-stub kernel.

A user ``--initrd`` is kept and the probe's archive appended after it (the kernel unpacks concatenated newc
archives in order, so ``/init`` is the probe's).  The kernel's modules are added when it is a Linux kernel with a
``/lib/modules/<release>`` tree.  Everything (images, QEMU) is gone when ``probe_kernel`` returns.
"""
from __future__ import annotations

import gzip
import io
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.kernel.probe import FILESYSTEMS, build_probe
from lab.kernel.profile import KernelProfile, probed_profile
from stonelab.errors import StonelabError
from vm.accel import AccelSelector
from vm.host import Kernel, default_kernel, kernel_from_path, require_program
from vm.initramfs import module_files, write_busybox_initramfs
from vm.machine import Machine, foreign_config, uefi_config
from vm.qemu import DiskSpec
from vm.transport import ConsoleTransport

BOOT_PROTOCOLS = ("linux", "multiboot", "uefi")
PROBE_MODULES = ("virtio_pci", "virtio_blk", "ext4", "vfat", "nls_cp437", "nls_iso8859_1", "nls_utf8", "nls_ascii",
                 "crc32c_generic")
END_MARKER = "STONELAB-PROBE-END"
DISK_MIB = 64
APPEND = "console=ttyS0 panic=-1 rdinit=/init"
INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for module in /mod/*.ko; do [ -e "$module" ] && insmod "$module" 2>/dev/null; done
echo "STONELAB-PROBE-BEGIN $(uname -sr)"
/bin/probe tmpfs /mnt/tmpfs tmpfs tmpfs
{runs}
if [ -d /sys/dev/block ] && [ -d /sys/class/block ]; then
  echo "STONELAB-PROBE * sysfs:block supported -- /sys/dev/block and /sys/class/block present: $(ls /sys/class/block | tr '\\n' ' ')"
else
  echo "STONELAB-PROBE * sysfs:block errno ENOENT 2 -- no /sys/dev/block or /sys/class/block"
fi
wb=$(cat /proc/sys/vm/dirty_writeback_centisecs 2>/dev/null)
if [ -n "$wb" ] && [ "$wb" != 0 ]; then
  echo "STONELAB-PROBE * writeback supported -- periodic writeback every $wb centiseconds"
else
  echo "STONELAB-PROBE * writeback wrong-semantics -- no periodic writeback (dirty_writeback_centisecs: ${{wb:-absent}})"
fi
echo "{end}"
sync
poweroff -f
"""


@dataclass(frozen=True)
class ProbeRun:
    """What a boot gave: the profile and the whole console (the evidence)."""

    profile: KernelProfile
    console: str
    exit_status: int | None


def check_image(image: Path, boot: str) -> None:
    """A one-line StonelabError when ``image`` is missing or does not carry the header ``boot`` needs (a
    gzip-compressed multiboot kernel is checked after :func:`probe_kernel` decompressed it)."""
    if boot not in BOOT_PROTOCOLS:
        raise StonelabError(f"--boot {boot}: not one of {', '.join(BOOT_PROTOCOLS)}")
    if not image.is_file():
        raise StonelabError(f"{image}: kernel image not found")
    head = image.read_bytes()[:32768]
    if boot == "linux" and head[0x202:0x206] != b"HdrS":
        raise StonelabError(f"{image}: not a Linux boot protocol image (no HdrS header at 0x202); try --boot multiboot")
    if boot == "multiboot":
        magic = (0x1BADB002).to_bytes(4, "little")
        if magic not in head[:8192]:
            raise StonelabError(f"{image}: no multiboot v1 header in its first 8 KiB (QEMU boots only multiboot v1 "
                                f"directly; use --boot uefi or --boot linux)")
    if boot == "uefi" and head[:2] != b"MZ":
        raise StonelabError(f"{image}: not an EFI executable (no MZ header) to boot through UEFI")


def _fs_disks(workdir: Path, filesystems: list[str]) -> list[tuple[str, Path]]:
    makers = {"ext2": ["mkfs.ext2", "-q", "-F", "-b", "4096", "-O", "^dir_index"], "ext4": ["mkfs.ext4", "-q", "-F"],
              "vfat": ["mkfs.vfat", "-F", "32"]}
    disks = []
    for fs in filesystems:
        if fs == "tmpfs":
            continue
        image = workdir / f"{fs}.img"
        with open(image, "wb") as handle:
            handle.truncate(DISK_MIB << 20)
        tool = require_program(makers[fs][0], "e2fsprogs" if fs.startswith("ext") else "dosfstools",
                               path="/usr/sbin:/sbin:/usr/bin:/bin")
        proc = subprocess.run([tool, *makers[fs][1:], str(image)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StonelabError(f"{image}: {makers[fs][0]} failed: {proc.stderr.strip()[-200:]}")
        disks.append((fs, image))
    return disks


def _initramfs(out: Path, probe: Path, disks: list[tuple[str, Path]], kernel: Kernel | None,
               user_initrd: Path | None, first_disk: int = 0) -> Path:
    runs = "\n".join(f"/bin/probe {fs} /mnt/{fs} /dev/vd{chr(ord('a') + first_disk + i)} {fs}"
                     for i, (fs, _) in enumerate(disks))
    init = INIT.format(runs=runs, end=END_MARKER)
    modules = module_files(kernel, PROBE_MODULES) if kernel is not None and kernel.has_modules else []
    archive = io.BytesIO()
    write_busybox_initramfs(archive, init, modules, files={"bin/probe": (probe.read_bytes(), 0o755)},
                            applets=("sh", "mount", "umount", "cat", "echo", "insmod", "mkdir", "ls", "tr", "sync",
                                     "poweroff", "uname"),
                            directories=("bin", "dev", "proc", "sys", "mod", "tmp", "mnt"))
    with open(out, "wb") as handle:
        if user_initrd is not None:
            data = user_initrd.read_bytes()
            handle.write(data + b"\0" * (-len(data) % 4))
        handle.write(archive.getvalue())
    return out


def _plain_image(image: Path, boot: str, work: Path) -> Path:
    """The image QEMU loads: a gzip-compressed multiboot kernel (Debian's ``xen-*.gz``) decompressed into
    ``work`` (QEMU's multiboot loader reads the file as it is); anything else as given."""
    with open(image, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    if boot != "multiboot" or not compressed:
        return image
    plain = work / image.name.removesuffix(".gz")
    try:
        with gzip.open(image) as source, open(plain, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    except (OSError, EOFError) as err:
        raise StonelabError(f"{image}: cannot decompress the gzip-compressed kernel ({err})") from None
    return plain


def _module_paths(modules: list[str], boot: str) -> list[Path]:
    """The files of ``--module "PATH[ ARGS]"`` values; StonelabError for a missing one or a non-multiboot boot."""
    if modules and boot != "multiboot":
        raise StonelabError(f"--module is for --boot multiboot (a multiboot kernel's modules), not --boot {boot}")
    paths = []
    for module in modules:
        words = shlex.split(module)
        if not words or not Path(words[0]).is_file():
            raise StonelabError(f"--module {module!r}: {words[0] if words else 'no path'}: module file not found")
        paths.append(Path(words[0]))
    return paths


def probe_kernel(image: Path, *, initrd: Path | None = None, boot: str = "linux",
                 filesystems: list[str] | None = None, accel: str = "auto", name: str | None = None,
                 timeout: float = 600.0, workdir: Path | None = None, modules: list[str] | None = None,
                 append: str | None = None, console_path: Path | None = None) -> ProbeRun:
    """Boot ``image`` with the probe and return the profile of what it did.  ``modules`` ("PATH[ ARGS]", multiboot
    only) come before the probe's initramfs; a Linux kernel among them (``vmlinuz-*``) gives the initramfs its
    modules.  ``append``: the booted kernel's command line (default ``APPEND``); ``console_path``: where the console goes
    when the boot ends, finished or not.  Raises StonelabError (one line)
    for a missing or wrong image or module, an unknown filesystem, or a guest that never reaches the end marker."""
    image = Path(image)
    filesystems = list(filesystems or FILESYSTEMS)
    modules = list(modules or [])
    unknown = [fs for fs in filesystems if fs not in FILESYSTEMS]
    if unknown:
        raise StonelabError(f"--fs {','.join(unknown)}: unknown filesystem (valid: {', '.join(FILESYSTEMS)})")
    if boot not in BOOT_PROTOCOLS:
        raise StonelabError(f"--boot {boot}: not one of {', '.join(BOOT_PROTOCOLS)}")
    if not image.is_file():
        raise StonelabError(f"{image}: kernel image not found")
    if initrd is not None and not Path(initrd).is_file():
        raise StonelabError(f"{initrd}: initrd not found")
    module_paths = _module_paths(modules, boot)
    linux = next((kernel_from_path(path) for path in [image, *module_paths] if path.name.startswith("vmlinuz-")),
                 None)
    probe = build_probe()
    with tempfile.TemporaryDirectory(prefix="stonelab-kprobe-", dir=workdir) as tmp:
        work = Path(tmp)
        loaded = _plain_image(image, boot, work)
        check_image(loaded, boot)
        disks = _fs_disks(work, filesystems)
        # under UEFI the ESP disk comes first (the firmware boots the first disk), the filesystems follow it
        cpio = _initramfs(work / "initramfs.cpio", probe, disks, linux, Path(initrd) if initrd else None,
                          first_disk=1 if boot == "uefi" else 0)
        # KVM is judged with a Linux kernel (the bare-initramfs probe); it says nothing about the kernel's own bugs
        choice = AccelSelector().choose(linux or default_kernel(), accel)
        specs = [DiskSpec(path) for _, path in disks]
        if boot == "uefi":
            from vm.disk import DiskLayout, build_disk, uefi_esp_tree
            from vm.host import systemd_boot
            tree = uefi_esp_tree(work / "esp", image, cpio, append or APPEND, systemd_boot())
            esp = build_disk(work / "esp.img", DiskLayout(esp_mib=64, root_mib=8), esp_tree=tree)
            config = uefi_config(choice, DiskSpec(esp.path), extra_disks=specs, agent=False, share_host_root=False)
            config.debug_exit = True
        else:
            config = foreign_config(loaded, choice, append or APPEND, disks=specs, initrd=cpio,
                                    modules=(*modules, str(cpio)) if modules else ())
        with Machine(config, name="kprobe", transport=ConsoleTransport(), console_log=work / "console.log") as guest:
            try:
                guest.wait_for_console(END_MARKER + r"\s", timeout)
            except Exception as err:  # noqa: BLE001 — any way the guest fails is one line for the user
                tail = " | ".join(guest.console.tail(8)) if guest.console else ""
                raise StonelabError(f"{image}: the probe did not finish within {timeout:g}s ({type(err).__name__}); "
                                    f"last console lines: {tail[-600:]}") from None
            finally:
                if console_path is not None and guest.console is not None:  # the evidence, also of a failed boot
                    console_path.write_text(guest.console.text)
            status = guest.wait_for_exit(120)
            console = guest.console.text
    release = _kernel_release(console) or image.name
    profile = probed_profile(name or f"{_profile_stem(release)}", release, console, str(image),
                             persistent_root="ext4" if "ext4" in filesystems else "")
    profile.facts = (f"{profile.facts}; booted with --boot {boot}" + (f" --initrd {initrd}" if initrd else "")
                     + (f" --append {shlex.quote(append)}" if append else "")
                     + "".join(f" --module {shlex.quote(m)}" for m in modules))
    hypervisor = re.search(r"^\(XEN\) Xen version (\S+)", console, re.MULTILINE)
    if hypervisor:  # the probe ran in dom0: say on what
        profile.facts += f"; the probe ran in dom0 of Xen {hypervisor[1]}"
    return ProbeRun(profile, console, status)


def _kernel_release(console: str) -> str:
    for line in console.splitlines():
        if "STONELAB-PROBE-BEGIN " in line:
            return line.split("STONELAB-PROBE-BEGIN ", 1)[1].strip()
    return ""


def _profile_stem(release: str) -> str:
    """``Linux 6.1.0-57-amd64`` → ``linux-6.1.0-57-amd64``."""
    return "-".join(release.lower().split()) or "kernel"

