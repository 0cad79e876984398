"""Killing the package manager at every named fault point, then running any verb: /usr is exactly the old or the
new state, nothing is left in staging, and the store verifies — in reference mode.  In moss-compat mode the same
kills show upstream's observable failures (#576 leftover staging, the old tree lost from staging)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impl.faults import FAULT_POINTS
from tests.pm import REPO, make_package, pm, state_id, stonelab, usr_tree

SWITCHED_FROM = "swap.before"  # from here on the intent record is durable: recovery completes the switch
NEEDS_ESP = {"boot.mid"}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pkgs")
    files1 = {f"share/data/{i}": f"one {i}" for i in range(40)} | {"bin/tool": "v1", "share/empty": ""}
    files2 = {f"share/data/{i}": f"two {i}" for i in range(40)} | {"bin/tool": "v2", "lib/new": "new"}
    return {"v1": make_package(out, "tool", files1, symlinks={"bin/t": "tool"}),
            "v2": make_package(out, "tool", files2, version="2.0", symlinks={"bin/t": "tool"})}


def installed_v1(tmp_path: Path, pkgs, strategy: str, mode: str = "reference") -> Path:
    root = tmp_path / "root"
    root.mkdir()
    assert pm(root, strategy, "install", str(pkgs["v1"]), mode=mode).returncode == 0
    return root


def assert_consistent(root: Path, expected_tree: dict, expected_state: int) -> None:
    assert state_id(root) == expected_state
    assert usr_tree(root) == expected_tree
    assert not (root / ".moss/root/staging").exists(), "staging left behind"
    assert not (root / ".moss/intent.json").exists()
    verify = pm(root, "exchange" if not (root / "usr").is_symlink() else "symlink", "state", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("strategy", ["exchange", "symlink"])
@pytest.mark.parametrize("point", [p for p in FAULT_POINTS if p not in NEEDS_ESP])
def test_crash_at_every_point_recovers_old_or_new(tmp_path: Path, pkgs, strategy: str, point: str):
    root = installed_v1(tmp_path, pkgs, strategy)
    v1 = usr_tree(root)
    crashed = pm(root, strategy, "install", str(pkgs["v2"]), fault=f"{point}:crash")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    after = pm(root, strategy, "state", "list", "--json")  # any verb recovers
    assert after.returncode == 0, after.stderr
    rolled_forward = FAULT_POINTS.index(point) >= FAULT_POINTS.index(SWITCHED_FROM)
    if rolled_forward:
        v2 = usr_tree(root)
        assert v2["bin/tool"][1] != v1["bin/tool"][1] and "lib/new" in v2
        assert_consistent(root, v2, 2)
        assert (root / ".moss/root/1/usr").is_dir(), "the old state's tree was not archived"
        assert [s["id"] for s in json.loads(after.stdout)] == [1, 2]
    else:
        assert_consistent(root, v1, 1)
        assert [s["id"] for s in json.loads(after.stdout)] == [1]
    # and the installation keeps working: the interrupted install can simply be repeated
    assert pm(root, strategy, "install", str(pkgs["v2"])).returncode == 0
    assert "lib/new" in usr_tree(root)


@pytest.mark.parametrize("strategy", ["exchange", "symlink"])
@pytest.mark.parametrize("point", ["swap.before", "swap.after", "archive.after", "commit.after"])
def test_crash_during_rollback_recovers(tmp_path: Path, pkgs, strategy: str, point: str):
    root = installed_v1(tmp_path, pkgs, strategy)
    v1 = usr_tree(root)
    assert pm(root, strategy, "install", str(pkgs["v2"])).returncode == 0
    crashed = pm(root, strategy, "state", "activate", "1", fault=f"{point}:crash")
    assert crashed.returncode == -signal.SIGKILL
    assert pm(root, strategy, "state", "list").returncode == 0
    assert_consistent(root, v1, 1)
    assert (root / ".moss/root/2/usr/lib/new").exists()


def test_eio_fails_the_step_in_one_line_and_recovery_follows(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange")
    failed = pm(root, "exchange", "install", str(pkgs["v2"]), fault="blit.mid:eio")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("stonelab: error: ") and "EIO" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert pm(root, "exchange", "state", "list").returncode == 0
    assert_consistent(root, usr_tree(root), 1)


def test_pause_announces_the_point_and_waits(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange")
    env = {"STONELAB_FAULT": "swap.after:pause", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "stonelab.cli", "install", "-D", str(root), str(pkgs["v2"])],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        line = proc.stderr.readline()
        assert line.strip() == "STONELAB-FAULT swap.after"
        assert proc.poll() is None, "the process must wait at the fault point"
    finally:
        proc.kill()
        proc.wait()
    assert pm(root, "exchange", "state", "list").returncode == 0
    assert state_id(root) == 2 and not (root / ".moss/root/staging").exists()


# -- moss-compat: upstream's observable outcomes -----------------------------------------------------------------

def test_compat_leftover_staging_blocks_activation_576(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange", mode="moss-compat")
    assert pm(root, "exchange", "install", str(pkgs["v2"]), mode="moss-compat").returncode == 0
    crashed = pm(root, "exchange", "install", str(pkgs["v1"]), mode="moss-compat", fault="blit.mid:crash")
    assert crashed.returncode == -signal.SIGKILL
    assert (root / ".moss/root/staging/usr").is_dir()
    blocked = pm(root, "exchange", "state", "activate", "1", mode="moss-compat")
    assert blocked.returncode == 2 and "staging is not empty" in blocked.stderr
    # the reference recovers the very same root
    assert pm(root, "exchange", "state", "activate", "1").returncode == 0
    assert state_id(root) == 1 and not (root / ".moss/root/staging").exists()


def test_compat_loses_the_old_tree_left_in_staging(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange", mode="moss-compat")
    crashed = pm(root, "exchange", "install", str(pkgs["v2"]), mode="moss-compat", fault="swap.after:crash")
    assert crashed.returncode == -signal.SIGKILL
    assert state_id(root) == 2 and (root / ".moss/root/staging/usr/.stateID").read_text() == "1"
    assert not (root / ".moss/root/1").exists()
    # upstream's next transaction wipes staging: the only copy of state 1 is gone, rollback impossible
    assert pm(root, "exchange", "remove", "tool", mode="moss-compat").returncode == 0
    failed = pm(root, "exchange", "state", "activate", "1", mode="moss-compat")
    assert failed.returncode == 2 and "no tree" in failed.stderr


def test_reference_archives_the_old_tree_left_in_staging(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange", mode="moss-compat")
    v1 = usr_tree(root)
    pm(root, "exchange", "install", str(pkgs["v2"]), mode="moss-compat", fault="swap.after:crash")
    assert pm(root, "exchange", "state", "activate", "1").returncode == 0
    assert_consistent(root, v1, 1)


def test_compat_state_row_without_tree(tmp_path: Path, pkgs):
    root = installed_v1(tmp_path, pkgs, "exchange", mode="moss-compat")
    pm(root, "exchange", "install", str(pkgs["v2"]), mode="moss-compat", fault="state.recorded:crash")
    listing = json.loads(pm(root, "exchange", "state", "list", "--json", mode="moss-compat").stdout)
    assert [(s["id"], s["tree"]) for s in listing] == [(1, True), (2, False)]
    failed = pm(root, "exchange", "state", "activate", "2", mode="moss-compat")
    assert failed.returncode == 2 and "no tree" in failed.stderr
    assert pm(root, "exchange", "install", str(pkgs["v2"]), mode="moss-compat").returncode == 0
    assert state_id(root) == 3  # ids are never reused


# -- boot sync inside the transaction --------------------------------------------------------------------------

def kernel_package(out: Path, version: str, release: int) -> Path:
    from tests.test_boot_helpers import kernel_bytes
    return make_package(out, "linux", {"lib/kernel/6.1.0-lab/vmlinuz": kernel_bytes("6.1.0-lab", 8192, version),
                                       "lib/kernel/6.1.0-lab/10-default.initrd": f"initrd {version}" * 64},
                        version=version, release=release)


@pytest.mark.parametrize("point", ["boot.before", "boot.mid"])
def test_crash_during_boot_sync_is_finished_by_the_next_run(tmp_path: Path, point: str):
    from tests.test_boot_helpers import esp_listing, make_disk
    disk = make_disk(tmp_path / "disk.img", esp_sectors=65536)
    root = tmp_path / "root"
    root.mkdir()
    pkgs = tmp_path / "pkgs"
    boot = ["--esp", f"{disk}:1", "--root-device", f"{disk}:2"]
    first = stonelab("install", "-D", str(root), *boot, str(kernel_package(pkgs, "1", 1)))
    assert first.returncode == 0, first.stderr
    assert [e for e in esp_listing(disk) if e.startswith("loader/entries/")] == [
        "loader/entries/aerynos-6.1.0-lab-1.conf"]
    crashed = stonelab("install", "-D", str(root), *boot, str(kernel_package(pkgs, "2", 2)), fault=f"{point}:crash")
    assert crashed.returncode == -signal.SIGKILL
    entries = [e for e in esp_listing(disk) if e.startswith("loader/entries/")]
    assert "loader/entries/aerynos-6.1.0-lab-2.conf" not in entries  # the ESP still lists the old state only
    # any verb, without --esp: the intent record remembers where the boot entries go
    assert stonelab("state", "list", "-D", str(root)).returncode == 0
    entries = [e for e in esp_listing(disk) if e.startswith("loader/entries/")]
    assert entries == ["loader/entries/aerynos-6.1.0-lab-1.conf", "loader/entries/aerynos-6.1.0-lab-2.conf"]
    status = stonelab("boot", "status", "-D", str(root), "--esp", f"{disk}:1")
    assert status.returncode == 0 and "default aerynos-6.1.0-lab-2.conf" in status.stdout, status.stdout


def test_a_lost_esp_after_the_switch_is_an_error_not_silence(tmp_path: Path, pkgs):
    from tests.test_boot_helpers import make_disk
    disk = make_disk(tmp_path / "disk.img", esp_sectors=65536, format_esp=False)
    root = tmp_path / "root"
    root.mkdir()
    boot = ["--esp", f"{disk}:1", "--root-device", f"{disk}:2"]
    result = stonelab("install", "-D", str(root), *boot, str(pkgs["v1"]))
    assert result.returncode == 2 and "boot entries were not written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert state_id(root) == 1 and not (root / ".moss/intent.json").exists()
    retyped = make_disk(tmp_path / "retyped.img", esp_sectors=65536, esp_type="L")  # no ESP partition left
    for mode, status in (("reference", 2), ("moss-compat", 0)):
        other = tmp_path / mode
        other.mkdir()
        result = stonelab("install", "-D", str(other), "--mode", mode, "--esp", str(retyped),
                          "--root-device", f"{retyped}:2", str(pkgs["v1"]))
        assert result.returncode == status, result.stderr
        assert state_id(other) == 1
        # upstream reports success having written nothing; the reference names the problem
        assert (result.stderr == "") == (mode == "moss-compat"), result.stderr


@pytest.mark.parametrize("mode", ["reference", "moss-compat"])
def test_a_boot_sync_that_cannot_fit_is_refused_before_the_swap(tmp_path: Path, mode: str):
    """Issue 12: on a full ESP the reference refuses a transaction before /usr is swapped (the old state stays
    active, its row and tree intact, the ESP untouched); moss-compat swaps first and fails after, as upstream
    does (#866). Fails with STONELAB_MUTANT=swap-before-esp-check (the check skipped)."""
    from lab.faults import fill_esp
    from tests.test_boot_helpers import esp_listing, make_disk
    disk = make_disk(tmp_path / "disk.img", esp_sectors=65536)
    root = tmp_path / "root"
    root.mkdir()
    pkgs = tmp_path / "pkgs"
    boot = ["--mode", mode, "--esp", f"{disk}:1", "--root-device", f"{disk}:2"]
    assert stonelab("install", "-D", str(root), *boot, str(kernel_package(pkgs, "1", 1))).returncode == 0
    before_usr, before_esp = usr_tree(root), esp_listing(disk)
    fill_esp(root, disk)
    filled = esp_listing(disk)
    result = stonelab("install", "-D", str(root), *boot, str(kernel_package(pkgs, "2", 2)))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "full" in result.stderr
    states = json.loads(stonelab("state", "list", "--json", "-D", str(root), "--mode", mode).stdout)
    if mode == "reference":
        assert "not activated" in result.stderr
        assert state_id(root) == 1 and usr_tree(root) == before_usr
        assert [s["id"] for s in states] == [1]
        assert not any((root / ".moss/root/staging").iterdir()) if (root / ".moss/root/staging").exists() else True
        assert esp_listing(disk) == filled and set(before_esp) <= set(filled)
    else:
        assert "is active, but its boot entries were not written" in result.stderr
        assert state_id(root) == 2 and usr_tree(root) != before_usr
