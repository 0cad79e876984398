"""Report writers: JSON, JUnit XML (read back with junitparser), self-contained HTML."""
from __future__ import annotations

import json

from junitparser import Failure, JUnitXml
from rich.console import Console

from lab.invariants import Violation
from lab.report import RunReport, print_terminal, write_all
from lab.runner import ScenarioResult, StepResult


def _report() -> RunReport:
    ok = ScenarioResult("good", "scenarios/good.yaml", "fine", "host", "reference", "auto", "process kill",
                        steps=[StepResult(0, "install [a]", "ok", 0.5, "stonelab install a.stone")],
                        verdict="pass", reason="all invariants held", seconds=0.5)
    bad = ScenarioResult("bad <script>", "scenarios/bad.yaml", "shows #576", "host", "moss-compat", "exchange",
                         "process kill",
                         steps=[StepResult(0, "crash", "crashed", 0.2, "STONELAB_FAULT=blit.mid:crash ..."),
                                StepResult(1, "recover", "ok", 0.1, violations=[
                                    Violation("staging_empty", "/.moss/root/staging holds usr")])],
                         verdict="fail", reason="staging_empty violated", seconds=0.3)
    return RunReport([ok, bad])


def test_all_formats(tmp_path):
    report = _report()
    paths = write_all(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "junit.xml", "report.html"]
    data = json.loads(paths[0].read_text())
    assert data["counts"] == {"pass": 1, "fail": 1, "error": 0, "n/a": 0}
    assert data["scenarios"][1]["observed_violations"] == ["staging_empty"]
    xml = JUnitXml.fromfile(str(paths[1]))
    cases = {case.name: case for suite in xml for case in suite}
    assert set(cases) == {"good", "bad <script>"}
    assert cases["good"].is_passed
    (failure,) = cases["bad <script>"].result
    assert isinstance(failure, Failure) and "staging_empty" in failure.message
    page = paths[2].read_text()
    assert "bad &lt;script&gt;" in page and "<script>" not in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_terminal(tmp_path):
    console = Console(record=True, width=160)
    print_terminal(_report(), console)
    text = console.export_text()
    assert "1 passed, 1 failed, 0 errors" in text and "staging_empty" in text


def test_a_lab_error_carries_its_traceback(tmp_path):
    from junitparser import Error
    broken = ScenarioResult("broken", "scenarios/x.yaml", "", "host", "reference", "auto", "", verdict="error",
                            reason="lab error: KeyError: 'x'", traceback="Traceback (most recent call last):\n...")
    paths = write_all(RunReport([broken]), tmp_path)
    (case,) = [c for suite in JUnitXml.fromfile(str(paths[1])) for c in suite]
    (error,) = case.result
    assert isinstance(error, Error) and "KeyError" in error.message and "Traceback" in error.text
    assert "Traceback (most recent call last)" in paths[2].read_text()
