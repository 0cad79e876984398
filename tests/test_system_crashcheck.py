"""The check of one crash state of a real system: read where the disk is, judged with ALICE's contract. The
states here are copies of real roots, damaged the way the public reports describe; the crash engine produces
them from recorded writes instead."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.packages import expected_tree
from lab.systems import make_system
from lab.systems.crashcheck import CRASH_INVARIANTS, judge_system_state, observe_system
from lab.systems.ostree import remove_root
from tests.systems_helpers import HELLO_1, HELLO_2

REPO = Path(__file__).resolve().parents[1]
OLD, NEW = expected_tree([HELLO_1]), expected_tree([HELLO_2])


def copy_state(system, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    subprocess.run(["cp", "-a", str(system.root), str(state)], check=True)
    return state


@pytest.fixture
def nix(tmp_path: Path):
    if shutil.which("nix-env") is None:
        pytest.skip("nix-env is absent (Debian package nix-bin)")
    system = make_system("nix", tmp_path / "root", tmp_path / "work")
    system.prepare()
    assert system.install([HELLO_1], [HELLO_1]).ok
    return system


def judge(observed, *, succeeded=True, after_return=True, enabled=None):
    from lab.systems.nix import INVARIANTS
    return judge_system_state(observed, OLD, NEW, succeeded=succeeded, after_return=after_return,
                              enabled=enabled or (*CRASH_INVARIANTS, *INVARIANTS))


def test_old_state_is_fine_before_the_return_and_a_violation_after_it(nix, tmp_path: Path):
    observed = observe_system("nix", copy_state(nix, tmp_path), tmp_path / "scratch")
    assert observed["current"] == 1 and observed["violations"] == []
    assert judge(observed, after_return=False) == []
    assert judge(observed, succeeded=False) == []
    found = judge(observed)
    assert [v.invariant for v in found] == ["durable_success"]
    assert "old tree" in found[0].detail


def test_empty_schema_state_is_caught_in_a_subprocess(nix, tmp_path: Path):
    state = copy_state(nix, tmp_path)
    (state / "nix/var/nix/db/schema").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "lab.systems.crashcheck", "nix", str(state),
                           str(tmp_path / "scratch")], capture_output=True, text=True, cwd=REPO, check=True)
    observed = json.loads(proc.stdout)
    assert "nix_db_valid" in {v.invariant for v in judge(observed, after_return=False)}


def test_a_torn_generation_is_neither_old_nor_new(nix, tmp_path: Path):
    assert nix.install([HELLO_2], [HELLO_2]).ok
    state = copy_state(nix, tmp_path)
    observed = observe_system("nix", state, tmp_path / "scratch")
    observed["tree"]["bin/hello"] = ["file", "0" * 32, "0444"]  # a file with other contents
    found = {v.invariant for v in judge(observed)}
    assert found == {"atomic_usr", "durable_success"}


def test_ostree_state_with_a_dangling_loader_is_caught(tmp_path: Path):
    if shutil.which("ostree") is None:
        pytest.skip("ostree is absent (Debian package ostree)")
    system = make_system("ostree", tmp_path / "root", tmp_path / "work")
    system.prepare()
    try:
        assert system.install([HELLO_1], [HELLO_1]).ok
        state = copy_state(system, tmp_path)
        assert observe_system("ostree", state, tmp_path / "scratch")["violations"] == []
        loader = state / "boot/loader"
        loader.unlink()
        loader.symlink_to("loader.0")
        observed = observe_system("ostree", state, tmp_path / "scratch")
        assert "ostree_loader_complete" in {v["invariant"] for v in observed["violations"]}
        assert observed["current"] is None
    finally:
        remove_root(system.root)
        remove_root(tmp_path / "state")


def test_the_crash_engine_checks_a_nix_state_with_the_systems_own_check(nix, tmp_path: Path):
    """The engine's guest job (``system: nix``) observes the state through lab.systems.crashcheck, and its judge
    applies ALICE's contract and Nix's invariants; a reference job would not call it."""
    from lab.crash import materialize
    from lab.crash.check import Oracle, judge as judge_state
    from lab.systems import invariants_of
    state = copy_state(nix, tmp_path)
    job = materialize.Job(device="/dev/null", system="nix", system_root=state.name)
    observed = materialize._observe_system(job, str(tmp_path))
    assert observed["current"] == 1 and observed["violations"] == []
    oracle = Oracle(OLD, NEW, True, invariants=invariants_of("nix"), system="nix")
    assert Oracle.from_dict(json.loads(json.dumps(oracle.to_dict()))) == oracle
    result = {"system_state": observed}
    assert judge_state(result, oracle, after_return=False) == []
    assert [v.invariant for v in judge_state(result, oracle, after_return=True)] == ["durable_success"]
    (state / "nix/var/nix/db/schema").write_bytes(b"")  # NixOS/nix#7064
    damaged = {"system_state": materialize._observe_system(job, str(tmp_path))}
    assert "nix_db_valid" in {v.invariant for v in judge_state(damaged, oracle, after_return=False)}
    broken = {"system_state": materialize._observe_system(
        materialize.Job(device="/dev/null", system="guix", system_root=state.name), str(tmp_path))}
    (failure,) = judge_state(broken, oracle, after_return=False)
    assert failure.invariant == "recovers" and "could not be read" in failure.detail


def test_ostree_recovers_an_interrupted_deploy_with_its_own_cleanup(tmp_path: Path):
    """The crash state a deploy leaves between checking out the new deployment and swapping boot/loader: the old
    entry set and a deployment directory no entry names. Judged as it stands, the entry set does not match the
    deployments; after OSTree's own recovery (``admin cleanup``, which every deploy runs first) it is the old
    state, whole — and a recovery that fails is a ``recovers`` violation."""
    if shutil.which("ostree") is None:
        pytest.skip("ostree is absent (Debian package ostree)")
    from lab.crash.check import Oracle, judge as judge_state
    from lab.systems import invariants_of
    from lab.systems.ostree import OstreeSystem
    system = make_system("ostree", tmp_path / "root", tmp_path / "work")
    system.prepare()
    state = tmp_path / "state"
    try:
        assert system.install([HELLO_1], [HELLO_1]).ok
        copy_state(system, tmp_path)
        before = {p.name for p in system.deploy_dir().iterdir()}
        assert system.install([HELLO_2], [HELLO_2]).ok
        (new,) = [p for p in system.deploy_dir().iterdir() if p.name not in before and p.is_dir()]
        deploy = state / new.relative_to(system.root).parent
        subprocess.run(["cp", "-a", str(new), str(deploy)], check=True)
        as_is = observe_system("ostree", state, tmp_path / "scratch")
        assert "ostree_loader_complete" in {v["invariant"] for v in as_is["violations"]}
        recovered = observe_system("ostree", state, tmp_path / "scratch", recover=True)
        assert recovered["recovery"]["exit"] == 0 and recovered["violations"] == []
        assert not (deploy / new.name).exists()
        oracle = Oracle(OLD, NEW, True, invariants=invariants_of("ostree"), system="ostree")
        assert judge_state({"system_state": recovered}, oracle, after_return=False) == []
        failed = dict(recovered, recovery={"exit": 1, "output": "error: cleanup failed"})
        (violation,) = judge_state({"system_state": failed}, oracle, after_return=False)
        assert violation.invariant == "recovers" and "cleanup failed" in violation.detail
        assert OstreeSystem.recover is not None and make_system("nix", tmp_path, tmp_path).recover() is None
    finally:
        remove_root(system.root)
        remove_root(state)
