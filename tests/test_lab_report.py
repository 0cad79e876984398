"""Report formats: report.json (versioned, validated on load), JUnit XML (read back with junitparser), TAP 13,
self-contained HTML, the 80-column terminal summary, re-rendering, merging shards, the run directory layout."""
from __future__ import annotations

import json

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped
from rich.console import Console

from lab.invariants import Violation
from lab.report import (SCHEMA, ReportError, case_from_result, load_report, merge_reports, new_report,
                        new_run_directory, print_terminal, render_again, write_all)
from lab.runner import ScenarioResult, StepResult
from lab.verdict import Verdict


def _results() -> list[ScenarioResult]:
    ok = ScenarioResult("good", "scenarios/good.yaml", "fine", "host", "reference", "auto", "process kill",
                        steps=[StepResult(0, "install [a]", "ok", 0.5, "stonelab install a.stone",
                                          evidence={"atomic_usr": "/usr is exactly [a]"})],
                        verdict=Verdict.PASS, reason="all invariants held", seconds=0.5)
    bad = ScenarioResult("bad <script>[moss-compat/exchange]", "scenarios/bad.yaml", "shows #576", "vm",
                         "moss-compat", "exchange", "power cut",
                         steps=[StepResult(0, "crash", "crashed", 0.2, "STONELAB_FAULT=blit.mid:crash ...",
                                           crash={"states": 7, "model": "write cache", "per_boundary": {"1": 7}}),
                                StepResult(1, "recover", "ok", 0.1, violations=[
                                    Violation("staging_empty", "/.moss/root/staging holds usr")])],
                         verdict=Verdict.FAIL, reason="staging_empty violated", seconds=0.3,
                         console="[    1.0] booting\nSTONELAB-USERLAND uptime=1.2\n",
                         sections=[{"kind": "crash-states", "title": "Crash states", "data": {"checked": 12}}])
    na = ScenarioResult("skipped[reference/symlink]", "scenarios/bad.yaml", "", "host", "reference", "symlink", "",
                        verdict=Verdict.NOT_APPLICABLE, reason="symlink swap has no staging")
    broken = ScenarioResult("broken", "scenarios/x.yaml", "", "host", "reference", "auto", "",
                            verdict=Verdict.ERROR, reason="lab error: KeyError: 'x'",
                            traceback="Traceback (most recent call last):\n...")
    return [ok, bad, na, broken]


def _report(results=None):
    cases = [case_from_result(r, rerun=f"stonelab run {r.path} -k '{r.name}'") for r in results or _results()]
    return new_report(cases, started="2026-11-30T12:00:00+00:00", seconds=3.0, run={"shard": "1/2"})


def test_all_formats(tmp_path):
    paths = write_all(_report(), tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "junit.xml", "report.tap", "report.html"]
    data = json.loads(paths[0].read_text())
    assert data["schema"] == SCHEMA
    assert data["counts"] == {"pass": 1, "fail": 1, "error": 1, "n/a": 1}
    bad = data["cases"][1]
    assert bad["observed_violations"] == ["staging_empty"] and bad["id"] == "bad::bad <script>[moss-compat/exchange]@vm"
    assert bad["steps"][1]["started"] == pytest.approx(0.2)
    assert [s["kind"] for s in bad["sections"]] == ["crash-states", "crash-states"]
    assert bad["sections"][1]["title"] == "crash states of step 0: 7 checked, model write cache"

    cases = {case.name: case for suite in JUnitXml.fromfile(str(paths[1])) for case in suite}
    assert cases["good"].is_passed and cases["good"].classname == "stonelab.host.reference.reference.auto"
    (failure,) = cases["bad <script>[moss-compat/exchange]"].result
    assert isinstance(failure, Failure)
    assert failure.message == "staging_empty: /.moss/root/staging holds usr"    # the violated invariant
    assert "STONELAB-USERLAND" in cases["bad <script>[moss-compat/exchange]"].system_out  # console excerpt
    assert isinstance(cases["skipped[reference/symlink]"].result[0], Skipped)
    (error,) = cases["broken"].result
    assert isinstance(error, Error) and "KeyError" in error.message and "Traceback" in error.text

    tap = paths[2].read_text().splitlines()
    assert tap[:2] == ["TAP version 13", "1..4"]
    assert tap[2] == "ok 1 - good"
    assert tap[3] == "not ok 2 - bad <script>[moss-compat/exchange]"
    assert tap[4] == "  ---" and "  message: 'staging_empty: /.moss/root/staging holds usr'" in tap
    assert "ok 3 - skipped[reference/symlink] # SKIP symlink swap has no staging" in tap
    assert "not ok 4 - broken" in tap

    page = paths[3].read_text()
    assert "bad &lt;script&gt;" in page and "<script>" not in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    for shown in ("Matrix", "vm · reference · moss-compat · exchange", "Crash states", "STONELAB-USERLAND",
                  "/usr is exactly [a]", "Traceback (most recent call last)", "stonelab run scenarios/bad.yaml"):
        assert shown in page, shown


def test_rerender_and_bad_report_files(tmp_path):
    directory = tmp_path / "r"
    write_all(_report(), directory)
    for name in ("junit.xml", "report.tap", "report.html"):
        (directory / name).unlink()
    assert [p.name for p in render_again(directory)] == ["junit.xml", "report.tap", "report.html"]
    assert "not ok 2" in (directory / "report.tap").read_text()

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps({"schema": "stonelab-report/0"}))
    with pytest.raises(ReportError, match=r"old/report.json: schema 'stonelab-report/0' is not"):
        load_report(tmp_path / "old")
    data = json.loads((directory / "report.json").read_text())
    data["cases"][0]["verdict"] = "maybe"
    (directory / "report.json").write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"report.json: cases.0.verdict: "):
        load_report(directory)
    with pytest.raises(ReportError, match="no such report"):
        load_report(tmp_path / "absent")


def test_merge_joins_shards_and_refuses_overlap(tmp_path):
    results = _results()
    first, second = _report(results[:2]), _report(results[2:])
    merged = merge_reports([first, second], ["shard1", "shard2"])
    assert [c.id for c in merged.cases] == sorted(c.id for c in first.cases + second.cases)
    assert len(merged.cases) == 4 and merged.counts == {"pass": 1, "fail": 1, "error": 1, "n/a": 1}
    assert merged.run["merged"] == ["shard1", "shard2"]
    with pytest.raises(ReportError, match="shards overlap"):
        merge_reports([first, _report(results[1:])], ["shard1", "shard2"])


def test_terminal_summary_fits_80_columns():
    console = Console(record=True, width=80, color_system=None)
    print_terminal(_report(), console)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines() if "re-run: " not in line)
    assert "bad <script>[moss-compat/exchange]" in text          # a name is never broken mid-word
    assert "re-run: stonelab run scenarios/bad.yaml -k 'bad <script>[moss-compat/exchange]'" in text  # one line
    assert "1 passed, 1 failed, 1 errors, 1 not applicable" in text


def test_run_directories_and_latest(tmp_path):
    first = new_run_directory(tmp_path, "20261130T120000Z")
    second = new_run_directory(tmp_path, "20261130T120000Z")     # same second: a suffix, never overwritten
    assert (first.name, second.name) == ("20261130T120000Z", "20261130T120000Z-2")
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert not any(p.name.startswith(".latest") for p in tmp_path.iterdir())
