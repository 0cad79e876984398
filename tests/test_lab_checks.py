"""Step registry against the docs, the new invariants on hand-made observations, and seeded bugs caught by the
scenarios meant for them (host target)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.alice import check_trace
from lab.boot_invariants import BootEntriesValid
from lab.invariants import CheckContext, NoOrphanStates, UsrIsOneState
from lab.probe import Observation
from lab.runner import run_scenario
from lab.scenario import ScenarioError, load_scenario, load_scenarios
from lab.steps import REGISTRY
from lab.verdict import Verdict
from reference_impl.mutants import ENV_VAR

REPO = Path(__file__).resolve().parents[1]
PACKAGES = """
packages:
  base: {name: base, version: "1", files: {lib/b: "b"}}
  hello-1: {name: hello, version: "1", files: {bin/hello: "1"}}
  hello-2: {name: hello, version: "2", files: {bin/hello: "2"}}
  needs-missing: {name: nm, version: "1", depends: [name(missing)]}
"""


def test_every_step_is_documented_with_an_example_that_parses(tmp_path):
    docs = (REPO / "docs" / "SCENARIOS.md").read_text()
    for name, cls in REGISTRY.items():
        assert f"`{name}`" in docs and cls.example in docs, name
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: x\n{PACKAGES}steps:\n  - {cls.example}\n")
        assert load_scenario(path).steps[0].kind == name


@pytest.mark.parametrize("arg, where, problem", [
    ("{at: random, during: {install: [hello-1]}}", "1:21", "needs `at: random` and `seed: S`"),
    ("{at: random, seed: 1, explore: true, during: {install: [hello-1]}}", "1:21", "not both"),
    ("{at: sometime, seed: 1, during: {install: [hello-1]}}", "1:26", "Input should be 'random'"),
    ("{at: random, seed: 1, during: verify}", "1:51", "can only interrupt a transaction"),
])
def test_power_loss_forms(tmp_path, arg, where, problem):
    path = tmp_path / "p.yaml"
    path.write_text(f"steps: [power_loss: {arg}]\nname: x\n{PACKAGES}")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}:{where}: ") and problem in str(info.value), str(info.value)


def test_power_loss_accepts_the_crash_engine_form(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\n{PACKAGES}steps:\n  - power_loss: {{during: {{install: [hello-1]}}, explore: true}}\n")
    arg = load_scenario(path).steps[0].arg
    assert arg.explore and arg.during.kind == "install" and arg.at is None


GOOD_TRACE = """\
100 openat(AT_FDCWD</>, "/r/.moss/root/staging/usr/bin/x", O_WRONLY|O_CREAT, 0444) = 5</r/.moss/root/staging/usr/bin/x>
100 linkat(AT_FDCWD</>, "/r/.moss/assets/v2/aa", 3</r/.moss/root/staging/usr/bin>, "y", 0) = 0
100 syncfs(4</r>) = 0
100 renameat2(AT_FDCWD</>, "/r/.moss/root/staging/usr", AT_FDCWD</>, "/r/usr", RENAME_EXCHANGE) = 0
"""


def test_alice_contract():
    problems, evidence = check_trace(GOOD_TRACE.splitlines())
    assert problems == [] and evidence.startswith("1 switch")
    unsafe = [line for line in GOOD_TRACE.splitlines() if "syncfs" not in line]
    problems, _ = check_trace(unsafe)
    assert len(problems) == 1 and "line 2" in problems[0]
    symlink = ['7 symlinkat("../.moss/root/2/usr", AT_FDCWD</>, "/r/.moss/root/staging/usr/z") = 0',
               '7 rename("/r/usr.next", "/r/usr") = 0']
    assert check_trace(symlink)[0] and not check_trace([symlink[0], "7 sync() = 0", symlink[1]])[0]


def _boot(entries: dict[str, str], default: str) -> dict:
    return {"esp": "d:1", "problem": None, "partuuids": {"root-uuid": 2, "esp-uuid": 1},
            "files": ["EFI/os/6.1/vmlinuz", "EFI/os/6.1/10.initrd"], "loader_conf": f"default {default}\n",
            "entries": entries}


ENTRY = "title x\nlinux /EFI/os/6.1/vmlinuz\ninitrd /EFI/os/6.1/10.initrd\noptions root=PARTUUID={root} rw moss.fstx={state}\n"


@pytest.mark.parametrize("entry, default, strict, problem", [
    (ENTRY.format(root="root-uuid", state=2), "os-2", True, None),
    (ENTRY.format(root="root-uuid", state=1), "os-1", True, "boots state 1, not the active state 2"),
    (ENTRY.format(root="root-uuid", state=1), "os-1", False, None),
    (ENTRY.format(root="esp-uuid", state=2), "os-2", True, "is not the root partition's PARTUUID"),
    (ENTRY.format(root="root-uuid", state=3), "os-2", True, "moss.fstx=3 names no state with a tree"),
    (ENTRY.format(root="root-uuid", state=2).replace("10.initrd", "11.initrd"), "os-2", True, "is not on the ESP"),
    (ENTRY.format(root="root-uuid", state=2), "os*", True, "is a glob"),
])
def test_boot_entries_valid(entry, default, strict, problem):
    obs = Observation(state_id="2", db_states=[1, 2], archived=["1"])
    name = "os-" + re.search(r"fstx=(\d+)", entry).group(1)
    obs.boot = _boot({f"loader/entries/{name}.conf": entry}, default)
    outcome = BootEntriesValid.check(CheckContext(obs, [], {}, strict_boot=strict))
    if problem is None:
        assert outcome.held and "default" in outcome.evidence
    else:
        assert any(problem in p for p in outcome.problems), outcome.problems


def test_no_orphan_states_and_usr_is_one_state():
    obs = Observation(state_id="2", db_states=[1, 2, 3], archived=["1", "4"],
                      usr={"bin/a": ["file", "00ff", "0555"], "share/e": ["file", "99aa06d3014798d86001c324468d497f", "0444"]},
                      recorded_usr={"bin/a": ["file", "00ff", "0444"], "share/e": ["file", "99aa06d3014798d86001c324468d497f", "0444"]},
                      shared_empty_files=["share/e"])
    orphans = NoOrphanStates.check(CheckContext(obs, [], {})).problems
    assert "state(s) 3 recorded" in orphans[0] and "/.moss/root/4" in orphans[1]
    problems = UsrIsOneState.check(CheckContext(obs, [], {})).problems
    assert any("another mode" in p for p in problems) and any("#372" in p for p in problems)


@pytest.mark.parametrize("scenario, mutant, caught", [
    ("window-state-recorded[reference/exchange]", "keep-treeless-states", "no_orphan_states"),
    ("upstream-586-default-entry[reference/exchange]", "glob-default-entry", "boot_entries_valid"),
])
def test_a_seeded_bug_is_caught(scenario, mutant, caught, monkeypatch):
    files = {"window-state-recorded": "window-state-recorded.yaml",
             "upstream-586-default-entry": "upstream-586-default-entry.yaml"}
    cells = {s.name: s for s in load_scenarios(REPO / "scenarios" / files[scenario.split("[")[0]])}
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert run_scenario(cells[scenario]).verdict == Verdict.PASS
    monkeypatch.setenv(ENV_VAR, mutant)
    result = run_scenario(cells[scenario])
    assert result.verdict == Verdict.FAIL and caught in result.observed_violations, result.reason


def test_skip_syncfs_breaks_alices_contract(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\npackages:\n  a: {name: a, version: '1', files: {bin/a: a}}\nsteps: [install: [a]]\n"
                    "invariants: [alice]\n")
    monkeypatch.setenv(ENV_VAR, "skip-syncfs")
    result = run_scenario(load_scenario(path))
    assert result.verdict == Verdict.FAIL and result.observed_violations == ["alice"]
    assert "no syncfs/sync after the last change to the staged tree" in result.steps[0].violations[0].detail


@pytest.mark.parametrize("name, verdict, reason", [
    ("esp-lost", Verdict.PASS, "all invariants held"),
    ("upstream-866-esp-full", Verdict.PASS, "all invariants held"),
    ("window-state-recorded[moss-compat/exchange]", Verdict.PASS, "upstream gap reproduced (moss-semantics.md"),
    ("window-state-recorded[moss-compat/symlink]", Verdict.NOT_APPLICABLE, "upstream moss only swaps"),
])
def test_shipped_esp_and_matrix_scenarios(name, verdict, reason, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    cells = {s.name: s for s in load_scenarios(REPO / "scenarios" / (name.split("[")[0] + ".yaml"))}
    result = run_scenario(cells[name])
    assert result.verdict == verdict and result.reason.startswith(reason), result.reason
    if name == "esp-lost":
        refused = result.steps[3]
        assert refused.description == "expect_fail boot_sync" and "no ESP" in refused.note
        assert "nothing to boot from" in refused.evidence["boot_entries_valid"]
    if name == "upstream-866-esp-full":
        assert "full" in result.steps[4].note and "default" in result.steps[4].evidence["boot_entries_valid"]
    if verdict == Verdict.PASS and "gap" in reason:
        assert set(result.observed_violations) == {"alice", "no_orphan_states", "staging_empty"}
