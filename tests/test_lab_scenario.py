"""Scenario files: the shipped suite is valid; broken files give one line naming the file and the field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.scenario import ScenarioError, load_scenario, load_suite
from stonelab.cli import main

REPO = Path(__file__).resolve().parents[1]

GOOD = """
name: demo
packages:
  a1: {name: a, version: "1", files: {bin/a: "1"}}
  a2: {name: a, version: "2", files: {bin/a: "2"}}
steps:
  - install: [a1]
  - crash: {at: swap.before, during: {install: [a2]}}
  - recover
  - expect_usr: [[a1], [a2]]
expect_violations: [staging_empty]
"""


def test_shipped_suite_is_valid():
    scenarios = load_suite(REPO / "scenarios")
    assert len(scenarios) >= 2
    assert len({s.name for s in scenarios}) == len(scenarios)


def test_good_scenario_parses(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(GOOD)
    scenario = load_scenario(path)
    assert [s.kind for s in scenario.steps] == ["install", "crash", "recover", "expect_usr"]
    crash = scenario.steps[1]
    assert crash.arg.at == "swap.before" and crash.arg.during.kind == "install"
    assert scenario.expected_for("host") == ("staging_empty",) == scenario.expected_for("vm")


@pytest.mark.parametrize("text, where, problem", [
    ("name: x\nsteps: [\n", "3:1", "not valid YAML"),
    ("- a\n", "1:1", "top level: expected a mapping"),
    ("steps: [recover]\n", "1:1", "name: required field missing"),
    ("name: x\n", "1:1", "steps: required field missing"),
    ("name: x\nsteps: [instal]\n", "2:9", "steps[0]: unknown step 'instal' (did you mean 'install'?)"),
    ("name: x\nsteps:\n  - install: [ghost]\n", "3:15", "steps[0].install[0]: undeclared package 'ghost'"),
    ("name: x\ntarget: cloud\nsteps: [recover]\n", "2:9", "target: Input should be 'any', 'host' or 'vm'"),
    ("name: x\nsteps: [recover]\nexpect_violations: {cloud: [atomic_usr]}\n", "3:21",
     "expect_violations.cloud: Input should be 'any', 'host' or 'vm' (got 'cloud')"),
    ("name: x\nsteps: [recover]\nexpect_violations: {vm: atomic_usr}\n", "3:25",
     "expect_violations.vm: Input should be a valid list"),
    ("name: x\ncolour: red\nsteps: [recover]\n", "2:1", "colour: unknown field 'colour'"),
    # a key spelled like pydantic's own labels (found by `make fuzz`: it used to be an IndexError)
    ("name: x\nt[rget: host\nsteps: [recover]\n", "2:1", "t[rget: unknown field 't[rget'"),
    ("name: x\nsteps: [recover]\nexpect_violations: [vibes]\n", "3:21", "unknown invariant 'vibes'"),
    ("name: x\npackages: {p: {name: p, version: 1, files: {/etc/passwd: x}}}\nsteps: [recover]\n", "2:44",
     "must be relative to /usr"),
    ("name: x\nsteps:\n  - crash: {at: swap.before}\n", "3:12", "crash: missing field 'during'"),
    ("name: x\nsteps:\n  - crash: {at: blit.mid, during: verify}\n", "3:35", "can only interrupt a transaction"),
    ("name: x\nsteps:\n  - crash: {at: no.such.point, during: {install: [a]}}\n", "3:17",
     "steps[0].crash.at: crash: Input should be 'blit.begin'"),
    ("name: x\nsteps:\n  - activate: soon\n", "3:15", "activate: Input should be"),
    ("name: x\nsteps:\n  - activate: 0\n", "3:15", "state ids start at 1"),
    ("name: x\nsteps:\n  - prune: two\n", "3:12", "prune: Input should be a valid integer"),
    ("name: x\nsteps:\n  - recover: now\n", "3:14", "recover takes no argument"),
    ("name: x\ntags: 5\nsteps: [recover]\n", "2:7", "tags: Input should be a valid list (got 5)"),
    ("name: x\ntags: default\nsteps: [recover]\n", "2:7", "tags: Input should be a valid list (got 'default')"),
    ("name: x\npackages:\n  p: {name: p, version: '1', release: abc}\nsteps: [recover]\n", "3:39",
     "packages.p.release: Input should be a valid integer"),
    ("name: x\nname: y\nsteps: [recover]\n", "2:1", "duplicate key 'name'"),
    ("name: x\nmatrix: {mode: [reference, upstream]}\nsteps: [recover]\n", "2:28", "matrix.mode[1]"),
    ("name: x\nsteps:\n  - {install: [a], remove: [b]}\n", "3:5", "a step is a name or a one-key mapping"),
])
def test_broken_scenarios(tmp_path, capsys, text, where, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{where}: "), message
    assert problem in message, message
    capsys.readouterr()
    assert main(["scenario", "check", str(path)]) == 2  # the CLI in process (one subprocess test below)
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and f"{path}:{where}: " in stderr and problem in stderr, stderr


def test_run_refuses_a_broken_scenario_before_running_anything(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("name: y\nsteps:\n  - crash: {at: no.such.point, during: {install: [a]}}\n")
    result = subprocess.run([sys.executable, "-m", "stonelab.cli", "run", "--report-dir", str(tmp_path / "r"),
                             str(good), str(bad)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith(f"stonelab: error: {bad}:3:17: steps[0].crash.at")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_expected_violations_per_target(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nsteps: [recover]\nexpect_violations: {vm: [atomic_usr, store_integrity]}\n")
    scenario = load_scenario(path)
    assert scenario.expected_for("vm") == ("atomic_usr", "store_integrity")
    assert scenario.expected_for("host") == ()
    assert scenario.target == "any"


@pytest.mark.parametrize("text, problem", [
    ("name: x\nsteps: [recover]\ndescription: \"\\0\"\x00\n", "not valid YAML"),
    ("&a [*a]\n", "1:1: top level: expected a mapping"),
    ("name: x\nsteps:\n  - install: &a [*a]\n", "install"),
    ("name: x\ntags: &t [*t]\nsteps: [recover]\n", "tags"),
])
def test_hostile_yaml_is_one_line(tmp_path, text, problem):
    path = tmp_path / "h.yaml"
    path.write_bytes(text.encode())
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(str(path)) and problem in str(info.value)
