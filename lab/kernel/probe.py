"""Build the static semantic probe (probe.c, optionally linked with the flag-dropping shim.c) and run it on this
machine's kernel in given directories.  Booting it on any kernel is ``lab.kernel.boot``."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stonelab.errors import StonelabError

SOURCE = Path(__file__).resolve().parent / "probe.c"
SHIM = Path(__file__).resolve().parent / "shim.c"
FILESYSTEMS = ("tmpfs", "ext2", "ext4", "vfat")


@dataclass(frozen=True)
class Shim:
    """A kernel that ignores a flag: bits ``mask`` of argument ``arg`` (0-based) of syscall ``number`` are
    cleared before the call (e.g. ``Shim(316, 4, 2)``: renameat2 without RENAME_EXCHANGE)."""

    number: int
    arg: int
    mask: int

    def defines(self) -> list[str]:
        return [f"-DSHIM_NR={self.number}", f"-DSHIM_ARG={self.arg}", f"-DSHIM_MASK={self.mask:#x}",
                "-Wl,--wrap=syscall", str(SHIM)]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stonelab" / "probe"


def build_probe(cache: Path | None = None, shim: Shim | None = None) -> Path:
    """``probe.c`` compiled static (cached by source and shim), so it runs on any x86-64 kernel from an
    initramfs.  Raises StonelabError when no compiler or static libc is installed."""
    extra = shim.defines() if shim else []
    digest = hashlib.sha256(SOURCE.read_bytes() + SHIM.read_bytes() + " ".join(extra).encode()).hexdigest()[:16]
    cache = cache or cache_dir()
    binary = cache / f"probe-{digest}"
    if binary.is_file():
        return binary
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise StonelabError("no C compiler to build the kernel probe (Debian package gcc)")
    cache.mkdir(parents=True, exist_ok=True)
    part = binary.with_suffix(f".part{os.getpid()}")
    proc = subprocess.run([compiler, "-static", "-O2", "-o", str(part), str(SOURCE), *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise StonelabError(f"{SOURCE}: cannot build the static probe ({last}; static libc: Debian libc6-dev)")
    os.rename(part, binary)
    return binary


def filesystem_of(directory: Path) -> str:
    """The filesystem type of a directory, as /proc/self/mountinfo names it (longest matching mount point)."""
    target = os.path.realpath(directory)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            mount_point = fields[4].replace("\\040", " ")
            sep = fields.index("-")
            if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and \
                    len(mount_point) >= len(best):
                best, fstype = mount_point, fields[sep + 1]
    return fstype


def probe_here(directories: list[Path], binary: Path | None = None) -> str:
    """Run the probe on this machine's kernel in each directory (labelled with its filesystem type); its work
    directories are removed afterwards."""
    binary = binary or build_probe()
    output = []
    for directory in directories:
        if not directory.is_dir():
            raise StonelabError(f"{directory}: not a directory to probe")
        label = filesystem_of(directory)
        try:
            proc = subprocess.run([str(binary), label, str(directory)], capture_output=True, text=True, timeout=120)
        finally:
            for leftover in directory.glob("stonelab-probe.*"):
                shutil.rmtree(leftover, ignore_errors=True)
        output.append(proc.stdout)
    return "".join(output)
