"""The EROFS userland image and saved guests, without booting: what the image holds (symlink chains as on the
host, the venv without the editable hook, unchecked-hash bytecode), that its key follows its inputs, and which
guests can be saved."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impl.boot.sync import HOST_SYSTEMD_BOOT

from vm.accel import AccelChoice
from vm.errors import VmError
from vm.host import Kernel, default_kernel
from vm.initramfs import module_files
from vm.qemu import DiskSpec, MachineConfig
from vm.snapshot import _placeholders, state_key, virtual_size
from vm.userland import GUEST_ON_DEMAND_MODULES, UserlandSpec, _Stage, _stage, build_userland, input_key

REPO = Path(__file__).resolve().parents[1]


def small_project(tmp_path: Path) -> Path:
    project = tmp_path / "proj"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref\n")
    return project


def test_stage_keeps_symlink_chains(tmp_path):
    host = tmp_path / "host"
    (host / "real").mkdir(parents=True)
    (host / "real" / "python3.11").write_text("binary")
    os.symlink("python3.11", host / "real" / "python3")
    os.symlink(str(host / "real" / "python3"), host / "python")
    stage = _Stage(tmp_path / "stage")
    stage.add(host / "python")
    staged = tmp_path / "stage" / host.relative_to("/")
    assert os.readlink(staged / "python") == str(host / "real" / "python3")   # every link of the chain
    assert os.readlink(staged / "real" / "python3") == "python3.11"
    assert (staged / "real" / "python3.11").read_text() == "binary"


def test_image_contents(tmp_path):
    project = small_project(tmp_path)
    root = tmp_path / "root"
    _stage(UserlandSpec(project=project, programs=("sh", "env")), root)
    inside = root / project.relative_to("/")
    assert (inside / "pkg" / "__init__.py").is_file() and not (inside / ".git").exists()
    pyc = next((inside / "pkg" / "__pycache__").glob("__init__.*.pyc"))
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01   # unchecked-hash: never stats the source
    venv = root / Path(sys.prefix).relative_to("/")
    assert (venv / "pyvenv.cfg").is_file()
    site = next(venv.glob("lib/python3*/site-packages"))
    assert not list(site.glob("__editable__*")) and not (site / "pip").exists()
    assert (root / Path(shutil.which("sh")).relative_to("/")).exists()
    assert (root / Path(sys.executable).relative_to("/")).exists()
    gconv = Path("/usr/lib/x86_64-linux-gnu/gconv/IBM850.so")
    if gconv.exists():   # mtools converts FAT names through it (a boot sync in the guest needs it)
        assert (root / gconv.relative_to("/")).exists()
    if HOST_SYSTEMD_BOOT.exists():   # a rescue guest's `boot sync --rebuild` installs it on a wiped ESP
        assert (root / HOST_SYSTEMD_BOOT.relative_to("/")).is_file()
    for point in ("proc", "sys", "dev", "tmp", "mnt"):
        assert (root / point).is_dir()


def test_key_follows_inputs(tmp_path):
    project = small_project(tmp_path)
    spec = UserlandSpec(project=project, programs=("sh",))
    first = input_key(spec)
    assert input_key(spec) == first
    (project / "pkg" / "__init__.py").write_text("VALUE = 2\n")
    assert input_key(spec) != first
    (project / ".git" / "HEAD").write_text("other\n")   # not an input
    second = input_key(spec)
    assert input_key(spec) == second


@pytest.mark.skipif(not shutil.which("mkfs.erofs", path="/usr/sbin:/usr/bin:/sbin:/bin"),
                    reason="mkfs.erofs absent (Debian package erofs-utils)")
def test_build_is_cached_and_rebuilt_on_change(tmp_path):
    project = small_project(tmp_path)
    spec = UserlandSpec(project=project, programs=("sh",))
    built = build_userland(spec, cache=tmp_path / "cache")
    assert not built.cached and built.path.read_bytes()[1024:1028] == b"\xe2\xe1\xf5\xe0"  # EROFS magic
    assert build_userland(spec, cache=tmp_path / "cache").cached
    (project / "pkg" / "__init__.py").write_text("VALUE = 3\n")
    again = build_userland(spec, cache=tmp_path / "cache")
    assert not again.cached and again.path != built.path
    assert not list((tmp_path / "cache" / "userland").glob(".stage-*"))   # nothing half-built left


def test_state_key_and_what_cannot_be_saved(tmp_path):
    kernel_image = tmp_path / "vmlinuz"
    kernel_image.write_bytes(b"k")
    image, disk = tmp_path / "userland.erofs", tmp_path / "sut.img"
    image.write_bytes(b"u")
    disk.write_bytes(b"\0" * 4096)
    config = MachineConfig(accel=AccelChoice("tcg", "test"), kernel=Kernel(kernel_image, "", tmp_path),
                           initrd=kernel_image, append="stonelab.python=/x", share_host_root=False,
                           disks=[DiskSpec(disk), DiskSpec(image, readonly=True)])
    key = state_key(config, sys.executable)
    other_disk = tmp_path / "other.img"
    other_disk.write_bytes(b"\1" * 4096)   # another scenario's disk of the same size: the same saved guest
    assert state_key(dataclasses.replace(config, disks=[DiskSpec(other_disk), config.disks[1]]), sys.executable) == key
    assert state_key(dataclasses.replace(config, memory_mb=2048), sys.executable) != key
    with pytest.raises(VmError, match="9p"):
        state_key(dataclasses.replace(config, share_host_root=True), sys.executable)


def test_image_carries_the_crash_engines_tools_and_modules(tmp_path):
    kernel = default_kernel()
    modules = tuple(p.resolve() for p in module_files(kernel, GUEST_ON_DEMAND_MODULES))
    if not modules:
        pytest.skip(f"{kernel.modules}: no module tree for the default kernel")
    root = tmp_path / "root"
    _stage(UserlandSpec(project=small_project(tmp_path), programs=("modprobe", "dmsetup", "losetup"),
                        kernel_modules=modules), root)
    for module in modules:
        assert (root / module.relative_to("/")).is_file()
    tree = next(parent for parent in modules[0].parents if parent.parent.name == "modules")
    assert (root / tree.relative_to("/") / "modules.dep.bin").is_file()   # what modprobe looks a name up in
    proc = subprocess.run([shutil.which("modprobe", path="/usr/sbin:/sbin"), "-d", str(root / "usr"), "-S",
                           kernel.release, "--show-depends", "dm_snapshot"], capture_output=True, text=True)
    assert proc.returncode == 0 and "dm-snapshot.ko" in proc.stdout, proc.stderr   # resolvable inside the image
    for program in ("modprobe", "dmsetup", "losetup"):
        if found := shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin"):
            assert os.path.lexists(root / Path(found).relative_to("/"))
    # modprobe is a link to kmod: the libraries of the link's target are in the image too
    kmod = Path(shutil.which("modprobe", path="/usr/sbin:/sbin")).resolve()
    needed = subprocess.run(["ldd", str(kmod)], capture_output=True, text=True).stdout.split()
    for library in (word for word in needed if word.startswith("/") and ".so" in word):
        assert (root / Path(library).relative_to("/")).exists(), library


def _qcow2_over(base: Path, overlay: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
                   check=True)


def test_saved_guest_of_a_recording_generation(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img (Debian qemu-utils) is not installed")
    kernel_image = tmp_path / "vmlinuz"
    kernel_image.write_bytes(b"k")
    userland, disk = tmp_path / "userland.erofs", tmp_path / "sut.img"
    userland.write_bytes(b"u")
    disk.write_bytes(b"\0" * (1 << 20))
    config = MachineConfig(accel=AccelChoice("tcg", "test"), kernel=Kernel(kernel_image, "", tmp_path),
                           initrd=kernel_image, append="stonelab.python=/x stonelab.userland=vdc",
                           share_host_root=False,
                           disks=[DiskSpec(disk), DiskSpec(disk, readonly=True), DiskSpec(userland, readonly=True)])
    key = state_key(config, sys.executable)
    # a generation: a qcow2 overlay behind a write log over a read-only base — to the guest the same two disks
    overlay, log = tmp_path / "gen-1.qcow2", tmp_path / "gen-1.log"
    _qcow2_over(disk, overlay)
    log.write_bytes(b"")
    assert virtual_size(DiskSpec(overlay, format="qcow2")) == 1 << 20 != overlay.stat().st_size
    generation = [DiskSpec(overlay, format="qcow2", log=log), DiskSpec(disk, readonly=True), config.disks[2]]
    assert state_key(dataclasses.replace(config, disks=generation), sys.executable) == key
    # what the guest would notice changes the key: the userland image's file, a size, a write-through cache
    os.utime(userland, ns=(1, 1))
    assert state_key(config, sys.executable) != key
    key = state_key(config, sys.executable)
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(b"\0" * (2 << 20))
    assert state_key(dataclasses.replace(config, disks=[DiskSpec(bigger), *config.disks[1:]]), sys.executable) != key
    through = DiskSpec(disk, cache="writethrough")
    assert state_key(dataclasses.replace(config, disks=[through, *config.disks[1:]]), sys.executable) != key
    # the guest is saved with blank stand-ins for every disk but the userland image, recording nothing
    saved = _placeholders(dataclasses.replace(config, disks=generation), tmp_path)
    assert [d.path.parent == tmp_path and d.path.name.startswith("placeholder") for d in saved.disks] == \
        [True, True, False]
    assert [(d.format, d.log, d.readonly) for d in saved.disks[:2]] == [("raw", None, False), ("raw", None, True)]
    assert all(d.path.stat().st_size == 1 << 20 for d in saved.disks[:2]) and saved.disks[2] == config.disks[2]


def test_stale_images_dropped_and_a_vanished_one_tolerated(tmp_path, monkeypatch):
    """Two runs build and clean the cache at once (`make run` with --jobs 2): an image another run removed
    between the listing and its stat must not end this run (it did: FileNotFoundError in a scenario)."""
    from vm import userland
    cache = tmp_path / "userland"
    cache.mkdir()
    keep, old, vanished = (cache / f"userland-{name}.erofs" for name in ("keep", "old", "vanished"))
    for image in (keep, old, vanished):
        image.write_bytes(b"x")
        image.with_suffix(".json").write_text("{}")
    os.utime(old, (1, 1))
    real_glob = Path.glob

    def glob_then_vanish(self, pattern):
        found = list(real_glob(self, pattern))
        vanished.unlink(missing_ok=True)
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob_then_vanish)
    userland._drop_stale_images(cache, keep=keep)
    assert keep.exists() and not old.exists() and not old.with_suffix(".json").exists()
