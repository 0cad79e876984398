"""pytest plugin (entry point ``pytest11: stonelab``): ``pytest scenarios/`` collects every scenario cell as an
item and runs it with the lab's runner, so CI needs no other entry point; ``pytest-xdist -n N`` spreads the items
over N workers like any other tests.

Collected: ``*.yaml`` files below a directory named ``scenarios`` and any YAML file named on the command line.
Options (the runner's): ``--stonelab-target host|vm``, ``--stonelab-kernel``, ``--stonelab-accel``,
``--stonelab-tag`` (repeatable), ``--stonelab-no-snapshots``, ``--stonelab-report-dir DIR`` (the run's report,
written by the controlling process, also under xdist: each item ships its case to it in ``user_properties``).
A case that fails shows its reason and the `stonelab run` line that re-runs it; a case that does not apply is
skipped with the reason; ``-k`` works on the scenario names as usual.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

CASE_PROPERTY = "stonelab-case"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stonelab", "stonelab scenarios")
    group.addoption("--stonelab-target", choices=["host", "vm"], default=None,
                    help="where scenarios not pinned to a target run (default host)")
    group.addoption("--stonelab-kernel", default=None, help="guest kernel for the vm target")
    group.addoption("--stonelab-accel", choices=["auto", "kvm", "tcg"], default="auto")
    group.addoption("--stonelab-tag", action="append", default=[], help="only scenarios with this tag")
    group.addoption("--stonelab-no-snapshots", action="store_true", help="boot every guest afresh")
    group.addoption("--stonelab-report-dir", type=Path, default=None,
                    help="write the run's reports (JSON, JUnit, TAP, HTML) to DIR/<UTC timestamp>/")


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    named = any(Path(str(arg).split("::")[0]).resolve() == file_path.resolve() for arg in parent.config.args)
    if named or "scenarios" in file_path.parts:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self):
        from lab.scenario import load_scenarios

        wanted = set(self.config.getoption("stonelab_tag"))
        for scenario in load_scenarios(self.path):
            if wanted and not wanted & set(scenario.tags):
                continue
            yield ScenarioItem.from_parent(self, name=scenario.name, scenario=scenario)


class ScenarioFailed(Exception):
    """A case whose verdict is fail or error; the message is the report's reason and the re-run line."""


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario, **kwargs):
        super().__init__(**kwargs)
        self.scenario = scenario
        self.extra_keyword_matches.update(scenario.tags)  # `-k crash` selects by tag too

    def runtest(self) -> None:
        from lab.cli import rerun_command
        from lab.report import case_from_result
        from lab.runner import run_scenario
        from lab.verdict import Verdict

        config = self.config
        target = config.getoption("stonelab_target")
        factory = None
        kind = str(self.scenario.target) if str(self.scenario.target) != "any" else (target or "host")
        if kind == "vm":
            from lab.vm_target import vm_target_factory
            factory = vm_target_factory(config.getoption("stonelab_kernel"), config.getoption("stonelab_accel"),
                                        snapshots=not config.getoption("stonelab_no_snapshots"))
        result = run_scenario(self.scenario, target=target, vm_factory=factory)
        base = ["stonelab", "run"] + (["--target", target] if target else [])
        case = case_from_result(result, rerun=rerun_command(base, result.path, result.name))
        self.user_properties.append((CASE_PROPERTY, case.model_dump_json(by_alias=True)))
        if case.verdict == Verdict.NOT_APPLICABLE:
            pytest.skip(f"not applicable: {case.reason}")
        if case.verdict in (Verdict.FAIL, Verdict.ERROR):
            raise ScenarioFailed(f"{case.verdict}: {case.reason}\nre-run: {case.rerun}"
                                 + (f"\n{case.traceback}" if case.traceback else ""))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"scenario {self.name}"


class ReportCollector:
    """Gathers the cases from every item's report (in the xdist controller too) and writes the reports."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.cases: list = []
        self.started = None
        self.clock = time.monotonic()

    def pytest_sessionstart(self, session) -> None:
        from lab.report import now_utc
        self.started = now_utc()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        from lab.report import CaseModel
        for key, value in report.user_properties:
            if key == CASE_PROPERTY:
                self.cases.append(CaseModel.model_validate(json.loads(value)))

    def pytest_sessionfinish(self, session) -> None:
        from lab.report import new_report, new_run_directory, write_all
        if not self.cases:
            return
        report = new_report(sorted(self.cases, key=lambda c: c.id), started=self.started,
                            seconds=time.monotonic() - self.clock, run={"argv": "pytest", "jobs": "xdist"})
        directory = new_run_directory(self.directory)
        write_all(report, directory)


def pytest_configure(config: pytest.Config) -> None:
    directory = config.getoption("stonelab_report_dir", None)
    if directory is not None and not hasattr(config, "workerinput"):  # the controller writes, not the workers
        config.pluginmanager.register(ReportCollector(directory), "stonelab-report")
