"""The whole chain under QEMU: OVMF → systemd-boot from an ESP written by `sync_boot` (mtools, no mount) →
the default Type 1 entry → kernel + initrd from that entry.  The guest prints its command line: it must carry
the target state's moss.fstx, although a glob default ("aerynos*") would pick another entry."""
from __future__ import annotations

import glob
import io
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reference_impl.boot import sync_boot
from reference_impl.boot.gpt import read_gpt
from tests.test_boot_helpers import add_state_rows, make_disk, make_tree
from vm.cpio import CpioWriter

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
MARKER = "STONELAB-FSTX-CMDLINE:"

pytestmark = pytest.mark.vm


def _requirements() -> tuple[Path, Path]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    busybox = shutil.which("busybox")
    for path, what in ((OVMF_CODE, "ovmf"), (SYSTEMD_BOOT, "systemd-boot-efi")):
        if not path.exists():
            pytest.skip(f"{path} absent (Debian package {what})")
    if not kernels or busybox is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs /boot/vmlinuz-*, busybox-static and qemu-system-x86")
    return Path(kernels[-1]), Path(busybox)


def _initrd(busybox: Path) -> bytes:
    init = (f"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
            f"echo \"{MARKER} $(/bin/busybox cat /proc/cmdline)\"\n/bin/busybox poweroff -f\n")
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    for name in ("bin", "proc", "dev"):
        cpio.directory(name)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init.encode(), 0o755)
    cpio.close()
    return buf.getvalue()


def test_systemd_boot_boots_the_target_states_entry(tmp_path: Path) -> None:
    vmlinuz, busybox = _requirements()
    root = tmp_path / "root"
    initrd = _initrd(busybox)
    for state_id in (1, 2, 3):
        tree = root / "usr" if state_id == 3 else root / ".moss" / "root" / str(state_id) / "usr"
        make_tree(tree, state_id, "6.1.0-lab", cmdline="console=ttyS0 panic=-1")
        kdir = tree / "lib" / "kernel" / "6.1.0-lab"
        shutil.copyfile(vmlinuz, kdir / "vmlinuz")
        (kdir / "10-default.initrd").write_bytes(initrd)
    add_state_rows(root, [1, 2, 3])
    disk = make_disk(tmp_path / "disk.img", esp_sectors=65536 * 2)
    report = sync_boot(root, esp=disk, root_device=f"{disk}:2", target=2, bootloader=SYSTEMD_BOOT)
    assert report.default_entry == "aerynos-6.1.0-lab-2.conf"
    vars_copy = tmp_path / "vars.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    log = tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none",
           "-no-reboot", "-serial", f"file:{log}", "-monitor", "none",
           "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
           "-drive", f"if=pflash,format=raw,file={vars_copy}",
           "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and MARKER in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        text = log.read_text(errors="replace") if log.exists() else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    assert lines, f"guest never printed its command line; console tail: {text[-2000:]!r}"
    cmdline = lines[0].split()
    guid = read_gpt(disk).partition(2).part_guid
    assert "moss.fstx=2" in cmdline and "moss.fstx=3" not in cmdline
    assert f"root=PARTUUID={guid}" in cmdline
