"""`stonelab crash explore` and `stonelab crash replay` for real systems, end to end in guests (make test-crash):
the Nix upgrade's crash states show NixOS/nix#1218/#11457 (a reported success lost; a registered store path whose
contents do not match its hash), each violation has a reproducer that replays to the same verdict in a fresh
guest; OSTree's upgrade holds in every state checked (exit 0). Three guest boots."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.systems_helpers import require_nix_ostree_and_kernel

pytestmark = [pytest.mark.vm, pytest.mark.crash_vm, pytest.mark.long]  # 388 s here, three boots: make test-crash
STATES = 8


@pytest.fixture(autouse=True)
def _needs_binaries_and_kernel():
    require_nix_ostree_and_kernel()


def stonelab(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stonelab.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_nix_upgrade_explored_and_each_reproducer_replays(tmp_path: Path):
    proc = stonelab("crash", "explore", "scenarios/nix-power-cut-upgrade.yaml", "--max-states", str(STATES),
                    "--out", str(tmp_path), "--json")
    assert proc.returncode == 1, proc.stderr[-600:]
    summary = json.loads(proc.stdout)
    assert summary["states"] == STATES and summary["scenario_verdict"] == "pass", summary["reason"]
    found = {v["invariant"]: v for v in summary["violations"]}
    assert {"durable_success", "nix_store_verified"} <= set(found)
    assert found["durable_success"]["after_return"]
    repro = json.loads(Path(found["durable_success"]["reproducer"]).read_text())
    assert repro["oracle"]["system"] == "nix" and repro["system_root"] == "nix"
    replayed = stonelab("crash", "replay", found["durable_success"]["reproducer"], "--json")
    verdict = json.loads(replayed.stdout)
    assert replayed.returncode == 1 and verdict["reproduced"], verdict


def test_ostree_upgrade_holds_in_every_state(tmp_path: Path):
    proc = stonelab("crash", "explore", "scenarios/ostree-power-cut-upgrade.yaml", "--max-states", str(STATES),
                    "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-600:] + proc.stdout[-600:]
    summary = json.loads(proc.stdout)
    assert summary["states"] == STATES and summary["violations"] == []
    assert summary["scenario_verdict"] == "pass"
