"""Issue 4, proof in a real boot: a disk whose two states were installed by the reference implementation boots
through OVMF → systemd-boot → the default entry into the newest state; making the older entry the default boots
the older state (the initramfs activates it); after the ESP is wiped, UEFI finds nothing to boot, `boot sync`
says so in one line, and `boot sync --rebuild` from a direct-kernel rescue boot makes the disk boot again with
every state listed."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lab.bootproof import BOOTED, booted_state, make_system_disk, stonelab
from vm.accel import AccelSelector
from vm.errors import VmError
from vm.host import default_kernel, ovmf_files
from vm.machine import PROJECT_DIR, Machine, agent_config, uefi_config
from vm.qemu import DiskSpec
from vm.transport import ConsoleTransport

pytestmark = pytest.mark.vm


def uefi_boot(accel, disk: Path, timeout: float = 300) -> tuple[str, str]:
    config = uefi_config(accel, DiskSpec(disk), agent=False, share_host_root=False)
    with Machine(config, name="uefi", transport=ConsoleTransport()) as machine:
        machine.wait_for_console(BOOTED.pattern, timeout)
        machine.wait_for_exit(60)
        return booted_state(machine.console.text)


def esp_entries(disk: Path) -> list[str]:
    proc = subprocess.run(["mdir", "-/", "-b", "-i", f"{disk}@@1M", "::/loader/entries"], capture_output=True,
                          text=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    return sorted(Path(line).name for line in proc.stdout.split() if line.endswith(".conf"))


def test_states_boot_through_uefi_and_a_wiped_esp_is_rebuilt(tmp_path: Path):
    try:
        kernel = default_kernel()
        ovmf_files()
    except VmError as err:
        pytest.skip(str(err))
    accel = AccelSelector().choose(kernel, "auto")
    system = make_system_disk(tmp_path, kernel, states=2)
    assert len(esp_entries(system.path)) == 2

    assert uefi_boot(accel, system.path) == ("2", "2")  # the default entry is the newest state

    stonelab("boot", "sync", "-D", str(system.root), "--esp", system.esp, "--root-device", system.root_device,
             "--state", "1")
    assert uefi_boot(accel, system.path) == ("1", "1")  # rollback from the boot menu: the initramfs activated 1

    with open(system.path, "r+b") as image:  # the ESP is wiped
        image.seek(system.layout.esp_offset)
        image.write(bytes(8 << 20))
    with pytest.raises(VmError):
        uefi_boot(accel, system.path, timeout=90)
    silent = subprocess.run([sys.executable, "-m", "stonelab.cli", "boot", "sync", "-D", str(system.root), "--esp",
                             system.esp, "--root-device", system.root_device], capture_output=True, text=True,
                            cwd=PROJECT_DIR)
    assert silent.returncode == 2 and len(silent.stderr.strip().splitlines()) == 1, silent.stderr

    with Machine(agent_config(kernel, accel, [DiskSpec(system.path)]), name="rescue") as rescue:
        rescue.succeed("mkdir -p /mnt/sut && mount -t ext4 /dev/vda2 /mnt/sut")
        sync = (f"cd {shlex.quote(str(PROJECT_DIR))} && {shlex.quote(sys.executable)} -m stonelab.cli boot sync "
                f"-D /mnt/sut --esp /dev/vda1 --root-device /dev/vda:2")
        refused = rescue.fail(sync).strip().splitlines()  # never silent about the missing filesystem
        assert len(refused) == 1 and refused[0].startswith("stonelab: error: "), refused
        rescue.succeed(sync + " --rebuild")
        rescue.succeed("umount /mnt/sut && sync")
    assert len(esp_entries(system.path)) == 2  # every state listed again
    assert uefi_boot(accel, system.path) == ("1", "1")  # the active state (1) is the default after the rebuild
