"""The boot and disk dimension of the lab on the VM target (issue 12), with as few guests as possible.

- one real UEFI boot through the runner: OVMF → systemd-boot → the older state's Type 1 entry; the guest must
  report that state and the initramfs must have activated it (and boot_entries_valid must then see that the
  default entry would bring the newer state back);
- one guest for the faults on the system disk: a clean reboot, a full root, a full ESP (the reference refuses
  before its swap), a wiped ESP and a deleted ESP partition, each met by the next operation with one line.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.runner import run_scenario
from lab.scenario import load_scenario
from tests.test_lab_vm import qemu_children, vm_factory  # noqa: F401 (a fixture)
from vm.errors import VmError
from vm.host import ovmf_files

pytestmark = pytest.mark.vm

FAKE_KERNELS = '''
  linux: {name: linux, version: "6.1", files: {lib/kernel/6.1.0-lab/vmlinuz: "kernel\\n",
                                                lib/kernel/6.1.0-lab/10-lab.initrd: "initrd\\n"}}
  linux-2: {name: linux, version: "6.2", files: {lib/kernel/6.2.0-lab/vmlinuz: "kernel two\\n",
                                                  lib/kernel/6.2.0-lab/10-lab.initrd: "initrd two\\n"}}
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_boot_step_brings_up_the_entry_it_picked_through_uefi(vm_factory, tmp_path: Path):
    try:
        ovmf_files()
    except VmError as err:
        pytest.skip(str(err))
    scenario = load_scenario(write(tmp_path, '''
name: uefi-rollback-from-the-boot-menu
target: vm
esp: true
packages:
  linux: {name: linux, version: "1", kernel: true}
  hello-1: {name: hello, version: "1", files: {share/hello/VERSION: "1\\n"}}
  hello-2: {name: hello, version: "2", files: {share/hello/VERSION: "2\\n"}}
steps:
  - install: [linux, hello-1]
  - install: [hello-2]
  - boot: {entry: 1}
  - expect_usr: [[linux, hello-1]]
  - boot_sync
expect_violations: [boot_entries_valid]
'''))
    result = run_scenario(scenario, vm_factory=vm_factory)
    assert result.verdict == "pass", result.reason
    boot = result.steps[2]
    assert boot.status == "ok" and "came up in state 1" in boot.note, boot.note
    assert "OVMF" in boot.command and "-1.conf" in boot.command
    assert "brought up state 1, as expected" in boot.evidence["boots_into"]
    # the one-time pick leaves loader.conf's default on state 2 while state 1 is active: caught, then repaired
    assert [v.invariant for v in boot.violations] == ["boot_entries_valid"]
    assert not result.steps[4].violations and "→ state 1" in result.steps[4].evidence["boot_entries_valid"]
    assert not qemu_children()


def test_disk_faults_on_the_vm_target(vm_factory, tmp_path: Path):
    scenario = load_scenario(write(tmp_path, f'''
name: disk-faults-in-one-guest
target: vm
esp: true
packages:{FAKE_KERNELS}
  hello-1: {{name: hello, version: "1", files: {{bin/hello: "one\\n"}}}}
  hello-2: {{name: hello, version: "2", files: {{bin/hello: "two\\n"}}}}
steps:
  - install: [linux, hello-1]
  - reboot
  - fill: esp
  - expect_fail: {{install: [linux-2]}}
  - wipe_esp
  - expect_fail: boot_sync
  - delete_esp
  - expect_fail: boot_sync
  - fill: root
  - expect_fail: {{install: [hello-2]}}
'''))
    result = run_scenario(scenario, vm_factory=vm_factory)
    steps = [(s.index, s.status, s.note, [v.detail for v in s.violations]) for s in result.steps]
    assert result.verdict == "pass", (result.reason, steps)
    notes = [s.note for s in result.steps]
    assert "power on" in notes[1], steps
    # a full ESP: the reference refuses before its swap (atomic_usr holds: /usr is still hello-1)
    assert "filled the ESP" in notes[2] and "not activated" in notes[3] and "full" in notes[3], steps
    assert "zeroed" in notes[4] and "not a FAT" in notes[5], steps
    assert "dropped /dev/vda1" in notes[6] and "no such" in notes[7], steps
    assert "filled the root" in notes[8] and "No space left" in notes[9], steps
    evidence = [s.evidence.get("boot_entries_valid", "") for s in result.steps]
    assert all("default" in e for e in evidence[:4]), evidence  # valid entries until the ESP was damaged
    assert all("nothing to boot from" in e for e in evidence[4:]), evidence
    assert not qemu_children()
