"""The lab's VM target end to end: the same power cut (QEMU killed the moment the guest announces `blit.mid`)
is caught as torn state against upstream's sequence (moss-compat: no fsync anywhere) and survived by the
reference implementation.  The first is the lab catching a real durability bug; the second would fail if the
reference lost its syncfs (checked by hand: it then shows `.stateID` empty after the cut)."""
from __future__ import annotations

import subprocess

import pytest

from lab.runner import run_scenario
from lab.scenario import load_scenario
from lab.vm_target import vm_target_factory
from tests.conftest import REPO
from vm.errors import VmError
from vm.host import default_kernel

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm_factory():
    try:
        default_kernel()
    except VmError as err:
        pytest.skip(str(err))
    return vm_target_factory()


def qemu_children() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-P", str(__import__("os").getpid())], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "qemu-system" in line]


def test_upstream_loses_a_finished_install_on_a_power_cut(vm_factory):
    result = run_scenario(load_scenario(REPO / "scenarios" / "upstream-power-cut.yaml"), vm_factory=vm_factory)
    assert result.verdict == "pass", result.reason
    assert {"atomic_usr", "state_id_matches", "store_integrity"} <= set(result.observed_violations)
    assert [s.status for s in result.steps] == ["ok", "crashed", "ok"]
    assert not qemu_children()


def test_reference_survives_the_same_power_cuts(vm_factory):
    result = run_scenario(load_scenario(REPO / "scenarios" / "reference-survives-power-cut.yaml"),
                          vm_factory=vm_factory)
    assert result.verdict == "pass", result.reason
    assert result.observed_violations == []
    assert [s.status for s in result.steps].count("crashed") == 2
    # the runner's power cuts use the volatile-cache model by default, and every crashed step says what it lost
    assert result.crash_semantics.startswith("volatile-cache power-loss model")
    assert all("write cache and are lost" in s.note for s in result.steps if s.status == "crashed")
    assert not qemu_children()


def test_recording_target_restores_a_saved_guest_and_records(vm_factory, tmp_path):
    """A recording target (the default) no longer boots over 9p: every power-on restores the saved guest, which
    then sees the generation's overlay as /dev/vda and its read-only base as /dev/vdb with their partitions (a
    restored guest that kept its placeholder disks' tables would show neither), and the write log records."""
    with vm_factory(tmp_path / "target") as target:
        assert target.record and not target.machine.config.share_host_root
        assert target.machine.boots[-1]["restored"] and target.generation.number == 1
        partitions = target.machine.succeed(["cat", "/proc/partitions"]).split()
        assert {"vda1", "vda2", "vdb1", "vdb2"} <= set(partitions)
        before = target.generation.log.stat().st_size
        target.shell("echo recorded > written && sync")
        assert target.generation.log.stat().st_size > before
        target.reboot()   # the next generation restores the same saved guest over its new overlay
        assert target.generation.number == 2 and target.machine.boots[-1]["restored"]
        assert target.shell("cat written").stdout == "recorded\n"
    assert not qemu_children()
