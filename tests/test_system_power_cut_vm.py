"""Real systems in a guest: both upgraded on one ext4 SUT disk, the power cut the moment both returned, the
crash state judged after a real reboot. Two boots for both systems (a few minutes under TCG). OSTree upgrades
first: it syncs the whole file system, which would also make Nix's earlier writes durable.

What this shows (and would stop showing if the lab broke): Nix 2.8 loses the new generation although it reported
success (the profile symlink's rename was never flushed) and keeps the new store path registered with contents
that do not match its hash (written without fsync, registered in SQLite with fsync) — NixOS/nix#1218/#11457;
OSTree, which syncs around its /boot/loader swap, keeps the new deployment."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lab.packages import expected_tree
from lab.runner import run_cache_dir
from lab.systems import make_system
from lab.systems.crashcheck import judge_system_state
from lab.systems.guest import GUEST_SCRATCH, GuestRunner, GuestSystem, RootFilesystem, SystemGuest
from lab.vm_target import GUEST_ROOT
from tests.systems_helpers import HELLO_1, HELLO_2
from vm.errors import VmError
from vm.host import default_kernel

pytestmark = pytest.mark.vm
ENABLED = ("atomic_usr", "durable_success", "nix_store_verified", "nix_db_valid", "nix_profile_complete",
           "ostree_fsck", "ostree_status", "ostree_loader_complete")


def test_a_power_cut_after_success(tmp_path: Path):
    for binary in ("nix-env", "ostree"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is absent (tools/debian-packages.txt)")
    try:
        default_kernel()
    except VmError as err:
        pytest.skip(str(err))
    with tempfile.TemporaryDirectory(dir=run_cache_dir()) as tmp, \
            SystemGuest(Path(tmp) / "vm", filesystem=RootFilesystem.EXT4) as guest:
        systems = {}
        for name in ("ostree", "nix"):
            inner = make_system(name, Path(GUEST_ROOT) / name, Path(tmp) / name, run=GuestRunner(guest.machine),
                                scratch=GUEST_SCRATCH / name)
            systems[name] = GuestSystem(inner, guest, GUEST_SCRATCH / name)
            systems[name].prepare()
            assert systems[name].install([HELLO_1], [HELLO_1]).ok
        guest.settle()
        for system in systems.values():
            assert system.install([HELLO_2], [HELLO_2]).ok
        guest.cut()
        assert not guest.machine.running
        verdicts = {}
        for name, system in systems.items():
            observed = system.observe()
            verdicts[name] = {v.invariant for v in judge_system_state(
                observed, expected_tree([HELLO_1]), expected_tree([HELLO_2]), succeeded=True, after_return=True,
                enabled=ENABLED)}
        assert guest.boots == 2
    assert verdicts["ostree"] == set()
    assert "durable_success" in verdicts["nix"] and "nix_store_verified" in verdicts["nix"]
