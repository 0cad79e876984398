"""Scenario files: the shipped suite is valid; broken files give one line naming the file and the field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.scenario import ScenarioError, load_scenario, load_suite

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
    assert crash.arg["at"] == "swap.before" and crash.arg["during"].kind == "install"
    assert scenario.expected_for("host") == ("staging_empty",) == scenario.expected_for("vm")


@pytest.mark.parametrize("text, problem", [
    ("name: x\nsteps: [\n", "not valid YAML (line 3)"),
    ("- a\n", "top level: expected a mapping"),
    ("steps: [recover]\n", "name: required"),
    ("name: x\n", "steps: required"),
    ("name: x\nsteps: [instal]\n", "steps[0]: unknown step 'instal'"),
    ("name: x\nsteps:\n  - install: [ghost]\n", "steps[0].install: undeclared package(s) ghost"),
    ("name: x\ntarget: cloud\nsteps: [recover]\n", "target: 'cloud' is not one of any, host, vm"),
    ("name: x\nsteps: [recover]\nexpect_violations: {cloud: [atomic_usr]}\n", "unknown target(s) cloud"),
    ("name: x\nsteps: [recover]\nexpect_violations: {vm: atomic_usr}\n", "each target needs a list"),
    ("name: x\ncolour: red\nsteps: [recover]\n", "unknown field(s) colour"),
    ("name: x\nsteps: [recover]\nexpect_violations: [vibes]\n", "unknown invariant(s) vibes"),
    ("name: x\npackages: {p: {name: p, version: 1, files: {/etc/passwd: x}}}\nsteps: [recover]\n",
     "must be relative to /usr"),
    ("name: x\nsteps:\n  - crash: {at: swap.before}\n", "crash needs {at: FAULT_POINT, during: STEP}"),
    ("name: x\nsteps:\n  - crash: {at: x, during: verify}\n", "can only crash during a transaction"),
    ("name: x\nsteps:\n  - activate: soon\n", "activate takes a state id or 'previous'"),
])
def test_broken_scenarios(tmp_path, text, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)
    result = subprocess.run([sys.executable, "-m", "stonelab.cli", "scenario", "check", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert problem in result.stderr


def test_expected_violations_per_target(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nsteps: [recover]\nexpect_violations: {vm: [atomic_usr, store_integrity]}\n")
    scenario = load_scenario(path)
    assert scenario.expected_for("vm") == ("atomic_usr", "store_integrity")
    assert scenario.expected_for("host") == ()
    assert scenario.target == "any"
