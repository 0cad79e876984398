"""The initramfs rollback script (busybox sh) on temp trees: both swap layouts, a pruned state, a torn swap."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "reference_impl" / "boot" / "initrd" / "stonelab-fstx.sh"
BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox (busybox-static) not installed")


def tree(path: Path, state_id: int) -> None:
    path.mkdir(parents=True)
    (path / ".stateID").write_text(str(state_id))
    (path / "marker").write_text(f"tree of state {state_id}")


def sysroot(tmp_path: Path, states: list[int], active: int, *, symlink: bool) -> Path:
    root = tmp_path / "sysroot"
    for state_id in states:
        if state_id == active and not symlink:
            tree(root / "usr", state_id)
        else:
            tree(root / ".moss" / "root" / str(state_id) / "usr", state_id)
    if symlink:
        os.symlink(f".moss/root/{active}/usr", root / "usr")
    return root


def run(tmp_path: Path, root: Path, cmdline: str) -> tuple[int, str]:
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    console = tmp_path / "console"
    console.write_text("")
    env = {"PATH": "/nonexistent", "SYSROOT": str(root), "FSTX_CMDLINE": str(tmp_path / "cmdline"),
           "FSTX_CONSOLE": str(console)}
    # Every applet through busybox: put a directory of busybox links first in PATH.
    bindir = tmp_path / "bin"
    if not bindir.exists():
        bindir.mkdir()
        for applet in ("cat", "tr", "mv", "ln", "rm", "mkdir", "rmdir", "sync"):
            os.symlink(BUSYBOX, bindir / applet)
    env["PATH"] = str(bindir)
    proc = subprocess.run([BUSYBOX, "sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode, console.read_text() + proc.stderr


def booted(root: Path) -> int:
    return int((root / "usr" / ".stateID").read_text())


@pytest.mark.parametrize("symlink", [False, True], ids=["exchange", "symlink"])
def test_matching_or_absent_fstx_changes_nothing(tmp_path: Path, symlink: bool) -> None:
    root = sysroot(tmp_path, [1, 2], active=2, symlink=symlink)
    for cmdline in ("root=PARTUUID=x rw moss.fstx=2", "root=PARTUUID=x rw", "quiet moss.fstx=abc"):
        code, out = run(tmp_path, root, cmdline)
        assert code == 0 and booted(root) == 2
    assert "malformed moss.fstx=abc" in out


@pytest.mark.parametrize("symlink", [False, True], ids=["exchange", "symlink"])
def test_rollback_activates_the_requested_state(tmp_path: Path, symlink: bool) -> None:
    root = sysroot(tmp_path, [1, 2, 3], active=3, symlink=symlink)
    code, out = run(tmp_path, root, "root=PARTUUID=x rw moss.fstx=1")
    assert code == 0 and booted(root) == 1
    assert "activating state 1 (was 3)" in out
    assert (root / "usr" / "marker").read_text() == "tree of state 1"
    # The previously active tree is archived, nothing is lost.
    assert (root / ".moss/root/3/usr/.stateID").read_text() == "3"
    assert (root / ".moss/root/2/usr/.stateID").read_text() == "2"
    if symlink:
        assert os.readlink(root / "usr") == ".moss/root/1/usr"
        assert not (root / "usr.fstx-new").exists()
    else:
        assert not (root / "usr").is_symlink() and not (root / ".moss/root/1").exists()
    # And forward again.
    code, _ = run(tmp_path, root, "moss.fstx=3")
    assert code == 0 and booted(root) == 3


@pytest.mark.parametrize("symlink", [False, True], ids=["exchange", "symlink"])
def test_pruned_state_boots_newest_and_says_so(tmp_path: Path, symlink: bool) -> None:
    root = sysroot(tmp_path, [2, 4], active=2, symlink=symlink)
    code, out = run(tmp_path, root, "moss.fstx=3")
    assert code == 0 and booted(root) == 4
    assert "state 3 is gone; booting the newest remaining state 4" in out
    root2 = sysroot(tmp_path / "b", [1, 5], active=5, symlink=symlink)
    code, out = run(tmp_path, root2, "moss.fstx=3")
    assert code == 0 and booted(root2) == 5
    assert "state 3 is gone; booting the newest remaining state 5" in out


def test_interrupted_exchange_is_completed(tmp_path: Path) -> None:
    root = sysroot(tmp_path, [1, 2], active=2, symlink=False)
    # Power lost between the two renames: /usr archived, the wanted tree not moved in yet.
    (root / ".moss/root/2").mkdir(parents=True)
    (root / "usr").rename(root / ".moss/root/2/usr")
    code, out = run(tmp_path, root, "moss.fstx=1")
    assert code == 0 and booted(root) == 1 and "interrupted activation" in out
    shutil.rmtree(root / "usr")
    shutil.rmtree(root / ".moss")
    code, out = run(tmp_path, root, "moss.fstx=1")
    assert code == 1 and "nothing to boot" in out


def test_script_is_posix_sh() -> None:
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    subprocess.run([BUSYBOX, "sh", "-n", str(SCRIPT)], check=True)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(SCRIPT)], check=True)
