"""The guest userland as a read-only EROFS image: exactly what the agent and the lab's guest commands need.

The image mirrors host paths (the interpreter, the venv, the project and the shell tools sit where they sit on the
host), so every command line the lab builds works unchanged in the guest. It holds:

* the interpreter the lab runs under (``sys.executable``, its symlink chain) and its standard library (without
  ``test``, ``site-packages`` of the base installation, IDLE/Tk and the build configuration);
* the venv (``sys.prefix``) without pip;
* the project (its Python packages, scenarios and metadata; no ``.git``, ``.venv``, reports or caches), with every
  module compiled to ``unchecked-hash`` bytecode — the image is rebuilt whenever a source changes, so the
  interpreter never needs to stat a source to trust its ``.pyc``;
* ``GUEST_PROGRAMS`` found on the host and the shared libraries of every ELF file above (``ldd``), plus the few
  ``/etc`` files the dynamic loader and ``pwd`` read; empty mount points for the init;
* ``kernel_modules`` (the crash engine's device-mapper snapshot, loop and RAM disk drivers,
  ``GUEST_ON_DEMAND_MODULES``)
  with their module tree's ``modules.*`` indexes, so ``modprobe`` in the guest loads them on demand.

It is cached under ``$XDG_CACHE_HOME/stonelab/userland/`` with a key over the inputs' paths, sizes and mtimes
(plus the ``ldd`` closure recorded at build time), built in a temporary directory and renamed into place, so
concurrent runs never see half an image. Unlike a 9p export, a guest whose userland is a disk image can be
saved and restored by QEMU (``vm.snapshot``).  EROFS: https://docs.kernel.org/filesystems/erofs.html;
``mkfs.erofs --preserve-mtime`` keeps per-file times (erofs-utils 1.5).
"""
from __future__ import annotations

import compileall
import hashlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vm.errors import VmError
from vm.host import require_program
from vm.initramfs import cache_dir
from reference_impl.boot.sync import HOST_SYSTEMD_BOOT
from vm.log import get_logger, nested

FORMAT_VERSION = "1"
log = get_logger("vm.userland")

GUEST_PROGRAMS = ("sh", "bash", "env", "mount", "umount", "mkdir", "cat", "ls", "stat", "touch", "sync", "sleep",
                  "uname", "rm", "cp", "mv", "ln", "truncate", "printf", "true", "false", "test", "echo", "head", "tail", "grep",
                  "sed", "chmod", "dd", "id", "df", "find", "xargs", "wc", "cut", "tr", "sort", "base64",
                  "sha256sum", "cmp", "diff", "blockdev", "mcopy", "mmd", "mdel", "mdir", "mtype", "mattrib", "mren",
                  "mrd", "date", "mkfs.vfat", "mkfs.fat", "fsck.vfat", "strace",
                  "sfdisk", "blkid",  # the boot probe and the ESP faults (lab/bootprobe, lab/faults)
                  "dmsetup", "losetup", "modprobe")  # the crash engine's crash-state devices (lab/crash/materialize)
# loaded by `modprobe` in the guest when needed (not at boot: every module loaded at boot delays agent-ready)
GUEST_ON_DEMAND_MODULES = ("dm_snapshot", "loop", "brd")  # brd: the crash states' copy-on-write RAM disks
ETC_FILES = ("/etc/ld.so.cache", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/localtime",
             "/etc/mtools.conf")
# the bootloader `boot sync` installs when a state ships none (reference_impl.boot.sync.HOST_SYSTEMD_BOOT): a
# rescue guest rebuilding a wiped ESP must find it as the host does
DATA_FILES = (str(HOST_SYSTEMD_BOOT),)
# glibc's character set converters (mtools converts FAT names through IBM850/437) and the C.UTF-8 locale the
# guest's commands run in
SUPPORT_TREES = ("/usr/lib/x86_64-linux-gnu/gconv", "/usr/lib/locale/C.utf8")
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run", "var/tmp", "mnt", "root")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # kept as on the host (merged /usr)
STDLIB_SKIP = {"test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}
TREE_SKIP = {".git", ".venv", ".bench-venv", "reports", ".hypothesis", ".pytest_cache", "__pycache__", "build", "node_modules"}
# Not in the image: the editable-install hook (the init puts the project on PYTHONPATH; the hook costs every guest
# interpreter pathlib, re and urllib at start-up), setuptools' distutils shim, Tk.
FILE_SKIP = ("__editable__", "distutils-precedence.pth", "_tkinter")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class UserlandSpec:
    """What goes into the image: the interpreter, its venv, the project directory and the host programs."""

    python: Path = field(default_factory=lambda: Path(sys.executable))
    project: Path = field(default_factory=lambda: Path(__file__).resolve().parents[1])
    programs: tuple[str, ...] = GUEST_PROGRAMS
    kernel_modules: tuple[Path, ...] = ()  # .ko files (from vm.initramfs.module_files), with their tree's indexes


@dataclass(frozen=True)
class Userland:
    """A built image: ``path`` (raw EROFS), ``key`` (its inputs' hash), ``cached`` (no build was needed)."""

    path: Path
    key: str
    cached: bool
    size: int


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _programs(spec: UserlandSpec) -> list[Path]:
    found = []
    for name in spec.programs:
        path = shutil.which(name, path=SBIN_PATH)
        if path:
            found.append(Path(path))
    return found


def _walk(top: Path, skip: set[str]) -> Iterator[Path]:
    """Files and symlinks below ``top`` (links are listed, not followed), skipping directories named in ``skip``."""
    for directory, dirnames, filenames in os.walk(top):
        links = [d for d in dirnames if os.path.islink(os.path.join(directory, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in skip and d not in links)
        for name in sorted(filenames + links):
            if not name.startswith(FILE_SKIP):
                yield Path(directory, name)


def _roots(spec: UserlandSpec) -> list[tuple[Path, set[str]]]:
    venv = Path(sys.prefix) if Path(spec.python).absolute().is_relative_to(sys.prefix) else None
    roots = [(_stdlib_dir(), STDLIB_SKIP), (spec.project.resolve(), TREE_SKIP),
             *((Path(tree), set()) for tree in SUPPORT_TREES if os.path.isdir(tree))]
    if venv is not None:
        roots.append((venv, {"pip"}))
    return roots


def _module_indexes(modules: tuple[Path, ...]) -> list[Path]:
    """The ``modules.*`` index files modprobe reads, of every module tree ``modules`` come from
    (``/lib/modules/<release>/kernel/...``)."""
    trees = {next(parent for parent in module.parents if parent.parent.name == "modules") for module in modules}
    return sorted(index for tree in trees for index in tree.glob("modules.*"))


def _inputs(spec: UserlandSpec) -> list[Path]:
    files = [Path(spec.python), *_programs(spec),
             *(Path(p) for p in (*ETC_FILES, *DATA_FILES) if os.path.exists(p)),
             *spec.kernel_modules, *_module_indexes(spec.kernel_modules)]
    for top, skip in _roots(spec):
        files.extend(_walk(top, skip))
    return files


def _stat_line(path: Path) -> str:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path}:absent"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode:o}"


def input_key(spec: UserlandSpec) -> str:
    """sha256 (24 hex digits) over the format version and every input's path, size, mtime and mode."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for path in _inputs(spec):
        digest.update(_stat_line(path).encode() + b"\n")
    return digest.hexdigest()[:24]


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def _shared_libraries(elves: list[Path]) -> set[Path]:
    """The shared libraries (and the dynamic loader) ``ldd`` lists for ``elves``."""
    ldd = require_program("ldd", "libc-bin")
    found: set[Path] = set()
    for chunk in range(0, len(elves), 64):
        proc = subprocess.run([ldd, *map(str, elves[chunk:chunk + 64])], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            words = line.split()
            for word in words:
                if word.startswith("/") and not word.endswith(":"):
                    found.add(Path(word))
    return found


class _Stage:
    """A directory tree that mirrors host paths: ``add(path)`` copies a file (hard link when possible) and every
    symlink on the way to it, so the same path resolves the same way inside the image."""

    def __init__(self, root: Path):
        self.root = root
        self.added: set[Path] = set()

    def _target(self, path: Path) -> Path:
        return self.root / path.relative_to("/")

    def add(self, path: Path) -> None:
        path = Path(os.path.abspath(path))
        if path in self.added:
            return
        self.added.add(path)
        parent = Path("/")
        for part in path.parts[1:-1]:  # symlinked parents (/lib64 -> usr/lib64, /bin -> usr/bin)
            parent = parent / part
            if parent.is_symlink():
                self._symlink(parent)
                self.add(parent.resolve() / Path(*path.parts[len(parent.parts):]))
                return
        if path.is_symlink():
            self._symlink(path)
            if not path.resolve().is_dir():
                self.add(path.parent / os.readlink(path))  # the next link of the chain, not just its end
            return
        if not path.exists():
            return
        target = self._target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            return
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)

    def _symlink(self, path: Path) -> None:
        target = self._target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            os.symlink(os.readlink(path), target)


def _stage(spec: UserlandSpec, root: Path) -> list[Path]:
    """Fill ``root``; returns the shared libraries pulled in (recorded in the manifest)."""
    stage = _Stage(root)
    inputs = _inputs(spec) + [Path(p) for p in MERGED_USR_LINKS if os.path.islink(p)]
    for path in inputs:
        stage.add(path)
    programs = {path.resolve() for path in _programs(spec)}  # a program may be a link (modprobe -> kmod)
    elves = sorted({p for p in inputs if not p.is_symlink() and (p.suffix == ".so" or ".so." in p.name or
                                                                 p.parent.name in ("bin", "sbin")) and _is_elf(p)}
                   | {p for p in programs if _is_elf(p)} | {Path(spec.python).resolve()})
    libraries = sorted(_shared_libraries(elves))
    for library in libraries:
        stage.add(library)
    for point in MOUNT_POINTS:
        (root / point).mkdir(parents=True, exist_ok=True)
    project = root / spec.project.resolve().relative_to("/")
    for source in sorted(project.rglob("*.py")):  # unchecked-hash: the image is rebuilt when a source changes
        if not any(part in TREE_SKIP for part in source.relative_to(project).parts):
            compileall.compile_file(source, quiet=2,
                                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return libraries


def build_userland(spec: UserlandSpec | None = None, cache: Path | None = None) -> Userland:
    """The EROFS userland image for ``spec`` (default: this interpreter, its venv, this project), from the cache
    when no input changed. Raises MissingHostTool without ``mkfs.erofs`` (Debian: erofs-utils), VmError when
    mkfs.erofs fails."""
    spec = spec or UserlandSpec()
    key = input_key(spec)
    directory = (cache or cache_dir()) / "userland"
    image = directory / f"userland-{key}.erofs"
    manifest = image.with_suffix(".json")
    if image.is_file() and manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if all(_stat_line(Path(p)) == line for p, line in recorded["libraries"].items()):
            return Userland(image, key, True, image.stat().st_size)
    mkfs = require_program("mkfs.erofs", "erofs-utils", path=SBIN_PATH)
    directory.mkdir(parents=True, exist_ok=True)
    with nested(log, f"building the guest userland image {image.name}"), \
            tempfile.TemporaryDirectory(dir=directory, prefix=".stage-") as tmp:
        root = Path(tmp) / "root"
        libraries = _stage(spec, root)
        part = Path(tmp) / "image.erofs"
        proc = subprocess.run([mkfs, "--quiet", "--all-root", "--preserve-mtime", str(part),
                               str(root)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise VmError(f"{image}: mkfs.erofs failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        manifest_part = Path(tmp) / "manifest.json"
        manifest_part.write_text(json.dumps({"key": key, "libraries": {str(p): _stat_line(p) for p in libraries}},
                                            indent=1))
        os.replace(manifest_part, manifest)
        os.replace(part, image)
    _drop_stale_images(directory, keep=image)
    return Userland(image, key, False, image.stat().st_size)


def _drop_stale_images(directory: Path, keep: Path, age: float = 3600.0) -> None:
    """Remove the images (and manifests) in ``directory`` older than ``keep`` by more than ``age`` seconds: one
    image per input set is enough. Other runs build and drop images concurrently, so an image that vanishes
    between the listing and its ``stat`` is simply gone already."""
    newest = keep.stat().st_mtime
    for stale in directory.glob("userland-*.erofs"):
        try:
            old = stale != keep and stale.stat().st_mtime < newest - age
        except FileNotFoundError:
            continue
        if old:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
