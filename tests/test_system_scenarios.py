"""Scenarios that name a system: validation (an operation the system lacks is one line, exit 2) and the default
suite's Nix and OSTree scenarios run end to end on real roots, calibration scenarios included."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from lab.runner import run_scenario
from lab.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"a": {"name": "a", "version": "1", "files": {"bin/a": "one\n"}}}


def scenario(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "packages": PACKAGES, "steps": [{"install": ["a"]}], **fields},
                                   sort_keys=False))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"system": "ostree", "steps": [{"install": ["a"]}, {"activate": 1}]},
     "steps[1]: system 'ostree' has no 'switch' operation (it has gc, install, remove, rollback, verify)"),
    ({"system": "ostree", "steps": [{"expect_fail": {"activate": 1}}]}, "system 'ostree' has no 'switch'"),
    ({"system": "nix", "steps": [{"crash": {"at": "swap.before", "during": {"install": ["a"]}}}]},
     "steps[0]: step 'crash' is for the reference implementation only"),
    ({"system": "guix"}, "system: Input should be 'reference', 'nix' or 'ostree'"),
    ({"system": "nix", "mode": "moss-compat"}, "mode: applies to the reference implementation only"),
    ({"system": "nix", "filesystem": "ext2"}, "filesystem: the root's file system is chosen on the vm target only"),
    ({"system": "nix", "steps": [{"power_loss": {"during": {"install": ["a"]}, "explore": True}}]},
     "steps[0]: power_loss needs the vm target (target: vm)"),
    ({"system": "nix", "target": "vm", "steps": [{"power_loss": {"during": {"activate": 1}, "explore": True}}]},
     "steps[0]: power_loss on system 'nix' explores an operation that makes or drops a generation"),
    ({"system": "ostree", "target": "vm",
      "steps": [{"power_loss": {"during": {"install": ["a"]}, "at": "random", "seed": 1}}]},
     "steps[0]: power_loss on system 'ostree' needs `explore: true`"),
    ({"system": "nix", "target": "vm", "steps": [{"power_cut": {"after": {"install": ["a"]}}}]},
     "steps[0].power_cut: unknown step 'power_cut' (did you mean 'power_loss'?)"),
    ({"system": "ostree", "target": "vm", "filesystem": "xfs"}, "filesystem: Input should be 'ext4' or 'ext2'"),
    ({"system": "nix", "invariants": ["staging_empty"]},
     "invariants[0]: invariant 'staging_empty' does not apply to system 'nix'"),
    ({"system": "ostree", "expect_violations": ["nix_db_valid"]},
     "expect_violations[0]: invariant 'nix_db_valid' does not apply to system 'ostree'"),
])
def test_what_a_system_cannot_do_is_one_line(tmp_path: Path, fields, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario(scenario(tmp_path, **fields))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'x.yaml'}:")


def test_system_defaults_and_invariants(tmp_path: Path):
    nix = load_scenario(scenario(tmp_path, system="nix"))
    assert nix.system == "nix"
    assert nix.invariants == ("atomic_usr", "durable_success", "nix_store_verified", "nix_db_valid",
                              "nix_profile_complete")
    assert load_scenario(scenario(tmp_path)).system == "reference"
    crash = load_scenario(scenario(tmp_path, system="ostree", expect_violations=["recovers", "ostree_fsck"]))
    assert set(crash.expected_for("vm")) == {"recovers", "ostree_fsck"}  # a crash state's own invariant, any system


def test_cli_check_refuses_in_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsystem: ostree\npackages: {a: {name: a, version: '1'}}\n"
                   "steps: [{install: [a]}, {activate: 2}]\n")
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "scenario", "check", str(bad)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "has no 'switch' operation" in proc.stderr


@pytest.mark.parametrize("name, binary", [
    ("nix-generations", "nix-env"), ("nix-corrupt-store-detected", "nix-env"),
    ("ostree-deployments", "ostree"), ("ostree-corrupt-object-detected", "ostree"),
])
def test_default_system_scenarios_pass(name: str, binary: str, tmp_path: Path):
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is absent (tools/debian-packages.txt)")
    loaded = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert "default" in loaded.tags
    result = run_scenario(loaded, workdir=tmp_path)
    assert result.verdict == "pass", result.reason
    assert result.system == loaded.system
    install = result.steps[0]
    assert install.evidence["atomic_usr"].startswith("generation ")
    held = set(loaded.invariants) - set(loaded.expected_for("host")) - {"durable_success"}
    assert held <= set(install.evidence), "an invariant that held left no evidence in the report"
    assert list(tmp_path.iterdir()) == [], "the scenario left files behind"


def test_expected_violations_with_an_upstream_report_read_as_reproduced():
    from lab.runner import ScenarioResult, StepResult, judge
    from lab.invariants import Violation

    def result(upstream: str) -> ScenarioResult:
        step = StepResult(0, "power_loss", "explored", 1.0, violations=[Violation("durable_success", "old tree")])
        return ScenarioResult("x", "x.yaml", "", "vm", "-", "-", "", steps=[step], system="nix",
                              expected_violations=["durable_success"], upstream=upstream)

    reproduced = result("NixOS/nix#1218")
    judge(reproduced)
    assert reproduced.verdict == "pass"
    assert reproduced.reason == "upstream gap reproduced (NixOS/nix#1218): caught durable_success"
    calibration = result("")
    judge(calibration)
    assert calibration.verdict == "pass" and calibration.reason == "caught as expected: durable_success"
