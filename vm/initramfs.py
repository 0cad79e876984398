"""Busybox initramfs images for the lab's guests, cached by kernel and inputs and built atomically.

Two kinds: ``agent`` (the kernel's virtio/9p/filesystem modules and the lab's init, see ``init.sh``) and
``bare`` (busybox and an init that prints a marker and powers off: the accelerator probe and the boot baseline).
"""
from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vm.cpio import CpioWriter
from vm.errors import VmError
from vm.host import Kernel, busybox_binary, require_program

FORMAT_VERSION = "2"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
BARE_MARKER = "STONELAB-BARE-OK"
BARE_INIT = f"""#!/bin/sh
/bin/mount -t proc proc /proc
echo "{BARE_MARKER} uptime=$(/bin/cut -d' ' -f1 /proc/uptime)"
/bin/poweroff -f
"""
# What the guest needs: virtio PCI transport, the system-under-test disk, the agent/fault ports, the userland (an
# EROFS image, or the 9p host root), and the filesystems the lab creates (ext4 root, FAT32 ESP, overlay).
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "erofs", "9pnet_virtio", "9p", "ext4", "vfat", "overlay",
                 "nls_cp437", "nls_iso8859_1", "nls_ascii", "crc32c_generic")
APPLETS = ("sh", "mount", "umount", "cat", "cut", "echo", "insmod", "modprobe", "mkdir", "ln", "sleep", "usleep",
           "poweroff", "reboot", "sync", "chroot", "setsid", "cttyhack", "ls", "dmesg", "env", "base64", "chmod")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stonelab"


def module_files(kernel: Kernel, modules: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """The ``.ko`` files for ``modules`` and their dependencies, in load order, each once."""
    if not kernel.has_modules:
        return []
    modprobe = require_program("modprobe", "kmod", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ordered: list[Path] = []
    for name in modules:
        proc = subprocess.run([modprobe, "-d", str(kernel.modules.parents[2]), "-S", kernel.release,
                               "--show-depends", name], capture_output=True, text=True)
        if proc.returncode != 0:
            if "not found" in proc.stderr:
                continue  # built into this kernel or absent from its config: nothing to load
            raise VmError(f"{kernel.modules}: modprobe --show-depends {name} failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                path = Path(words[1])
                if path not in ordered:
                    ordered.append(path)
    return ordered


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
    return data


def write_busybox_initramfs(out: BinaryIO, init: str, modules: list[Path], *, applets: tuple[str, ...] = APPLETS,
                            directories: tuple[str, ...] = ("bin", "dev", "proc", "sys", "mod", "tmp", "mnt"),
                            files: dict[str, tuple[bytes, int]] | None = None) -> None:
    """A newc archive: busybox and its applet links, ``/init``, the modules as ``mod/NNN-name.ko`` in load order,
    and extra ``files`` (path -> (content, mode))."""
    archive = CpioWriter(out)
    for directory in directories:
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", busybox_binary().read_bytes(), 0o755)
    for applet in applets:
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", init.encode(), 0o755)
    for name, (content, mode) in (files or {}).items():
        archive.file(name, content, mode)
    for number, module in enumerate(modules):
        archive.file(f"mod/{number:03d}-{module.name.split('.ko')[0]}.ko", _module_bytes(module))
    archive.close()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class Initramfs:
    path: Path
    kind: str
    modules: tuple[str, ...]
    cached: bool


def build_initramfs(kernel: Kernel, kind: str = "agent", cache: Path | None = None) -> Initramfs:
    """The initramfs of ``kind`` for ``kernel``, from the cache when its inputs have not changed."""
    if kind not in ("agent", "bare"):
        raise ValueError(kind)
    busybox = busybox_binary()
    modules = module_files(kernel) if kind == "agent" else []
    init = INIT_SCRIPT.read_text() if kind == "agent" else BARE_INIT
    key = hashlib.sha256("\n".join([FORMAT_VERSION, kind, _stat_key(kernel.image), _stat_key(busybox), init,
                                    *map(_stat_key, modules)]).encode()).hexdigest()[:24]
    directory = (cache or cache_dir()) / "initramfs"
    target = directory / f"{kind}-{kernel.release or kernel.image.name}-{key}.cpio"
    names = tuple(p.name.split(".ko")[0] for p in modules)
    if target.is_file():
        return Initramfs(target, kind, names, cached=True)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".cpio")
    try:
        with os.fdopen(fd, "wb") as out:
            write_busybox_initramfs(out, init, modules,
                                    directories=("bin", "dev", "proc", "sys", "host", "mod", "tmp", "mnt"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return Initramfs(target, kind, names, cached=False)
