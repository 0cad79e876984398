"""The crash engine end to end in real guests (TCG here): recorded writes, every crash state of an upgrade built
in the same guest and checked.  Small enumerations (``max_states`` in the scenarios) keep each test to one boot.

What each test proves:
- moss-compat (upstream's sequence, no fsync) loses or tears a transaction that reported success, and the
  volatile-cache model finds violations the optimistic (SIGKILL) model does not, on the same recording;
- the reference shows none, for both swap strategies;
- the seeded ``skip-syncfs`` bug is caught; the seeded ``no-flush`` bug (fsync without a cache FLUSH) is caught
  by the volatile-cache model only;
- a reproducer replays to the same verdict; ``stonelab crash explore --json`` reports states and violations;
  nothing is left running.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from lab.crash.check import Oracle
from lab.crash.explore import ExploreOptions, explore
from lab.crash.model import Model
from lab.crash.replay import replay
from lab.invariants import ExpectedTree
from lab.packages import build_packages, expected_tree
from lab.runner import Runner, run_cache_dir
from lab.scenario import load_scenario
from lab.vm_target import VmTarget
from reference_impl.swap import SwapStrategy
from tests.conftest import REPO

pytestmark = [pytest.mark.vm, pytest.mark.crash_vm]
SCENARIOS = REPO / "scenarios"
TEST_STATES = 9  # the default suite (make run) explores more: see max_states in the scenarios


def qemu_children() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "qemu-system" in line]


def explore_both_models(name: str, kernel, accel, **changes) -> tuple[dict, dict]:
    """Run scenario ``name`` (its last step a power_loss step, volatile-cache) on one recorded guest, then explore
    the same recorded operation again under the optimistic model; both explorations as dicts."""
    scenario = replace(load_scenario(SCENARIOS / name), **changes)
    with tempfile.TemporaryDirectory(prefix="crash-test-", dir=run_cache_dir()) as tmp:
        packages, decls = build_packages(scenario.packages, Path(tmp) / "packages")
        scenario = replace(scenario, packages=decls)
        with VmTarget(Path(tmp) / "target", kernel=kernel, accel=accel.accel) as target:
            runner = Runner(scenario, target, packages, Path(tmp), crash_overrides={"max_states": TEST_STATES})
            steps = [runner.run_step(step) for step in scenario.steps]
            assert all(s.status != "failed" for s in steps), [s.note for s in steps]
            volatile = steps[-1].crash
            inner = scenario.steps[-1].arg.during
            start, end = target.marks[-2], target.marks[-1]
            assert (start.label, end.label) == ("start", "return")
            # the oracle of the explored step, rebuilt from the packages (the runner's model moved on)
            before = [scenario.packages[k] for s in scenario.steps[:-1] if s.kind == "install" for k in s.arg]
            after = {d.name: d for d in before} | {scenario.packages[k].name: scenario.packages[k] for k in inner.arg}
            new = expected_tree(list(after.values()))
            oracle = Oracle(expected_tree(before), ExpectedTree("new " + new.label, new.files),
                            end.exit_status == 0, runner.baseline)
            recovery = ["state", "list", "-D", "{root}", "--mode", str(scenario.mode), "--swap", str(scenario.swap)]
            optimistic = explore(target, start.log_bytes, end.log_bytes, end.exit_status, oracle, recovery,
                                 ExploreOptions(model=Model.OPTIMISTIC, max_states=TEST_STATES)).to_dict()
    assert not qemu_children()
    return volatile, optimistic


def invariants(exploration: dict) -> set[str]:
    return {v["invariant"] for v in exploration["violations"]}


def test_moss_compat_loses_what_it_reported_and_only_a_volatile_cache_shows_all_of_it(kernel, accel):
    volatile, optimistic = explore_both_models("crash-moss-compat.yaml", kernel, accel)
    assert volatile["states"] >= 8 and volatile["model"] == "volatile-cache"
    assert {"durable_success", "atomic_usr"} <= invariants(volatile)
    # states only a volatile cache can leave (an earlier write lost, a later one kept) fail too
    assert volatile["failing_per_kind"].get("subset", 0) + volatile["failing_per_kind"].get("sample", 0) > 0
    assert optimistic["model"] == "optimistic" and set(optimistic["per_kind"]) == {"prefix"}


@pytest.mark.parametrize("swap", ["exchange", "symlink"])
def test_reference_holds_in_every_crash_state(kernel, accel, swap):
    volatile, optimistic = explore_both_models("crash-reference.yaml", kernel, accel, swap=SwapStrategy(swap))
    assert volatile["states"] >= 8
    assert volatile["violations"] == [] and optimistic["violations"] == []


def test_seeded_skip_syncfs_is_caught(kernel, accel, monkeypatch):
    monkeypatch.setenv("STONELAB_MUTANT", "skip-syncfs")
    volatile, _ = explore_both_models("crash-reference.yaml", kernel, accel)
    assert invariants(volatile) & {"atomic_usr", "durable_success", "state_id_matches", "store_integrity"}


def test_seeded_fsync_without_flush_is_caught_by_the_volatile_cache_model_only(kernel, accel, monkeypatch):
    monkeypatch.setenv("STONELAB_MUTANT", "no-flush")
    volatile, optimistic = explore_both_models("crash-reference.yaml", kernel, accel)
    assert volatile["violations"] and not optimistic["violations"]


def test_cli_explore_json_and_replay_of_a_reproducer(tmp_path, kernel, accel):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "crash", "explore",
                           str(SCENARIOS / "crash-moss-compat.yaml"), "--max-states", "9", "--seed", "3",
                           "--accel", accel.accel, "--json", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 1, proc.stderr  # 1: violations found
    report = json.loads(proc.stdout)
    assert report["states"] <= 9 and report["violations"]
    violation = report["violations"][0]
    assert violation["invariant"] and Path(violation["reproducer"]).is_file()
    repro = json.loads(Path(violation["reproducer"]).read_text())
    assert replay(Path(violation["reproducer"]), kernel=kernel, accel=accel.accel) == repro["verdict"]
    assert not qemu_children()
