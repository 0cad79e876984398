"""The whole chain under QEMU: OVMF → systemd-boot from an ESP written by `sync_boot` (mtools, no mount) →
the default Type 1 entry → kernel + initrd from that entry.  The guest prints its command line: it must carry
the target state's moss.fstx, although a glob default ("aerynos*") would pick another entry."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from reference_impl.boot import sync_boot
from reference_impl.boot.gpt import read_gpt
from tests.test_boot_helpers import add_state_rows, make_disk, make_tree
from vm.errors import MissingHostTool
from vm.host import ovmf_files, systemd_boot
from vm.initramfs import write_busybox_initramfs
from vm.machine import Machine, uefi_config
from vm.qemu import DiskSpec
from vm.transport import ConsoleTransport

MARKER = "STONELAB-FSTX-CMDLINE:"

pytestmark = pytest.mark.vm


def _initrd() -> bytes:
    init = (f"#!/bin/sh\n/bin/mount -t proc proc /proc\n"
            f"echo \"{MARKER} $(/bin/cat /proc/cmdline)\"\n/bin/poweroff -f\n")
    buffer = io.BytesIO()
    write_busybox_initramfs(buffer, init, [])
    return buffer.getvalue()


def test_systemd_boot_boots_the_target_states_entry(tmp_path: Path, kernel, accel) -> None:
    try:
        ovmf_files()
        bootloader = systemd_boot()
    except MissingHostTool as err:
        pytest.skip(str(err))
    root = tmp_path / "root"
    initrd = _initrd()
    for state_id in (1, 2, 3):
        tree = root / "usr" if state_id == 3 else root / ".moss" / "root" / str(state_id) / "usr"
        make_tree(tree, state_id, "6.1.0-lab", cmdline="console=ttyS0 panic=-1")
        kdir = tree / "lib" / "kernel" / "6.1.0-lab"
        (kdir / "vmlinuz").write_bytes(kernel.image.read_bytes())
        (kdir / "10-default.initrd").write_bytes(initrd)
    add_state_rows(root, [1, 2, 3])
    disk = make_disk(tmp_path / "disk.img", esp_sectors=65536 * 2)
    report = sync_boot(root, esp=disk, root_device=f"{disk}:2", target=2, bootloader=bootloader)
    assert report.default_entry == "aerynos-6.1.0-lab-2.conf"
    config = uefi_config(accel, DiskSpec(disk), agent=False, share_host_root=False)
    with Machine(config, name="uefi-entry", transport=ConsoleTransport()) as machine:
        machine.wait_for_console(MARKER + r"[^\n]*\n", 240)  # the whole line, not its start
        text = machine.console.text
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    assert lines, f"guest never printed its command line; console tail: {text[-2000:]!r}"
    cmdline = lines[0].split()
    guid = read_gpt(disk).partition(2).part_guid
    assert "moss.fstx=2" in cmdline and "moss.fstx=3" not in cmdline
    assert f"root=PARTUUID={guid}" in cmdline
