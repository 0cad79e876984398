"""The runner on the host target: registries, matrix cells, and the lab's own failures kept apart from verdicts."""
from __future__ import annotations

import pytest

from lab.invariants import INVARIANTS
from lab.runner import run_scenario
from lab.scenario import load_scenarios
from lab.steps import REGISTRY
from lab.steps.expectations import ExpectUsr
from lab.verdict import Verdict

SMALL = """
name: small
packages:
  a1: {name: a, version: "1", files: {bin/a: "1"}}
steps:
  - install: [a1]
  - expect_usr: [[a1]]
"""

MATRIX = """
name: grid
matrix: {mode: [reference, moss-compat], swap: [exchange, symlink]}
cells:
  - when: {mode: moss-compat}
    expect_violations: [staging_empty]
    upstream: "moss #576"
  - when: {mode: moss-compat, swap: symlink}
    not_applicable: upstream moss only swaps with renameat2(RENAME_EXCHANGE)
packages:
  a1: {name: a, version: "1", files: {bin/a: "1"}}
steps:
  - install: [a1]
"""


def _one(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_scenarios(path)


def test_every_step_kind_and_invariant_is_described():
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.summary and cls.example.split(":")[0].strip() == name
    for name, cls in INVARIANTS.items():
        assert cls.name == name and cls.summary


def test_matrix_expands_into_cells(tmp_path):
    cells = {s.name: s for s in _one(tmp_path, MATRIX)}
    assert set(cells) == {"grid[reference/exchange]", "grid[reference/symlink]", "grid[moss-compat/exchange]",
                          "grid[moss-compat/symlink]"}
    assert cells["grid[reference/symlink]"].expected_for("host") == ()
    compat = cells["grid[moss-compat/exchange]"]
    assert compat.expected_for("host") == ("staging_empty",) and compat.upstream == "moss #576"
    assert cells["grid[moss-compat/symlink]"].not_applicable.startswith("upstream moss only")
    result = run_scenario(cells["grid[moss-compat/symlink]"])
    assert result.verdict == Verdict.NOT_APPLICABLE and "RENAME_EXCHANGE" in result.reason and not result.steps


def test_a_lab_bug_is_an_error_verdict_with_its_traceback(tmp_path, monkeypatch):
    (scenario,) = _one(tmp_path, SMALL)

    def broken(cls, runner, step, result):
        raise KeyError("a bug in the lab")
    monkeypatch.setattr(ExpectUsr, "run", classmethod(broken))
    result = run_scenario(scenario, workdir=tmp_path)
    assert result.verdict == Verdict.ERROR and "KeyError" in result.reason
    assert "Traceback" in result.traceback and "a bug in the lab" in result.traceback
    assert [s.status for s in result.steps] == ["ok"]  # the install ran; the run stopped at the bug
    monkeypatch.undo()
    again = run_scenario(scenario, workdir=tmp_path)  # the next scenario of the run is unaffected
    assert again.verdict == Verdict.PASS, again.reason
    assert "atomic_usr" in again.steps[1].evidence and "store_integrity" in again.steps[1].evidence
    assert list(tmp_path.iterdir()) == [tmp_path / "s.yaml"]
