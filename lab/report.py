"""Reports of a run: ``report.json`` (the versioned data every other format is rendered from), JUnit XML
(junitparser), TAP 13, one self-contained HTML page (jinja2) and the terminal summary (rich).

The JSON schema is ``stonelab-report/1`` (the ``schema`` field), validated on load by the pydantic models below
(``stonelab report --schema`` prints it as JSON Schema; docs/REPORTS.md explains each field). A report holds
*cases* — one per scenario × system (target) × mode × swap — and *sections*: a list of ``{kind, title, data}``
at the top level and in each case, so that other parts of the lab (crash-state enumeration, kernel gaps) add their
evidence without a schema change; the HTML page renders known kinds specially and any other kind generically.
A new schema version is needed only when a field changes meaning or disappears.

``stonelab report DIR`` re-renders every format from ``DIR/report.json``; ``stonelab report --merge DIR… -o OUT``
joins shards (every case once: a case id seen twice is an error).
TAP 13: https://testanything.org/tap-version-13-specification.html
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lab.verdict import Verdict
from stonelab.errors import StonelabError

SCHEMA = "stonelab-report/1"
FORMATS = ("report.json", "junit.xml", "report.tap", "report.html")
CONSOLE_EXCERPT_LINES = 60


class ReportError(StonelabError):
    """A report directory or file that cannot be read or merged; one line naming the file."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Section(_Model):
    """Evidence another part of the lab attaches: ``kind`` picks how the HTML page shows ``data``."""

    kind: str
    title: str
    data: Any = None


class ViolationModel(_Model):
    invariant: str
    detail: str


class StepModel(_Model):
    index: int
    description: str
    status: str                       # ok | failed | crashed
    seconds: float
    started: float = 0.0              # seconds since the case started (the timeline)
    command: str = ""
    output: str = ""
    note: str = ""
    violations: list[ViolationModel] = Field(default_factory=list)
    evidence: dict[str, str] = Field(default_factory=dict)   # invariant -> what showed it held


class CaseModel(_Model):
    id: str                           # unique in a report: "<file stem>::<name>@<target>"
    name: str                         # the scenario's name (a matrix cell: "name[mode/swap]")
    file: str
    description: str = ""
    target: str
    system: str = "reference"         # the system under test (reference, nix, ostree)
    mode: str
    swap: str
    verdict: Verdict
    reason: str = ""
    seconds: float = 0.0
    attempts: int = 1                 # > 1: re-run after a failure (--rerun-failures)
    expected_violations: list[str] = Field(default_factory=list)
    observed_violations: list[str] = Field(default_factory=list)
    crash_semantics: str = ""
    environment: str = ""
    upstream: str = ""
    traceback: str = ""
    console: str = ""                 # the last lines of the guest's serial console (VM target)
    rerun: str = ""                   # the command line that runs exactly this case again
    steps: list[StepModel] = Field(default_factory=list)
    sections: list[Section] = Field(default_factory=list)


class ReportModel(_Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(SCHEMA, alias="schema")
    started: str
    finished: str
    seconds: float
    environment: dict[str, str] = Field(default_factory=dict)
    run: dict[str, Any] = Field(default_factory=dict)          # argv, shard, jobs, …
    counts: dict[str, int] = Field(default_factory=dict)
    cases: list[CaseModel] = Field(default_factory=list)
    sections: list[Section] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No case failed or errored (n/a cases do not count against a run)."""
        return all(case.verdict in (Verdict.PASS, Verdict.NOT_APPLICABLE) for case in self.cases)

    def recount(self) -> None:
        self.counts = {str(v): sum(1 for c in self.cases if c.verdict == v) for v in Verdict}


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def host_environment() -> dict[str, str]:
    return {"host_kernel": platform.release(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": str(os.cpu_count() or 0)}


def case_id(result) -> str:
    """The id of a ScenarioResult (or CaseModel) in reports and shards: file stem, name and target."""
    system = getattr(result, "system", "reference")
    suffix = "" if str(system) == "reference" else f"/{system}"
    return f"{Path(result.path if hasattr(result, 'path') else result.file).stem}::{result.name}@{result.target}{suffix}"


def case_from_result(result, *, attempts: int = 1, rerun: str = "") -> CaseModel:
    """A ``lab.runner.ScenarioResult`` as a report case."""
    steps = []
    elapsed = 0.0
    for step in result.steps:
        steps.append(StepModel(index=step.index, description=step.description, status=step.status,
                               seconds=step.seconds, started=elapsed, command=step.command, output=step.output,
                               note=step.note, evidence=dict(step.evidence),
                               violations=[ViolationModel(invariant=v.invariant, detail=v.detail)
                                           for v in step.violations]))
        elapsed += step.seconds
    console = getattr(result, "console", "")
    sections = [Section(**s) if isinstance(s, dict) else s for s in getattr(result, "sections", [])]
    for step in result.steps:   # a power_loss explore step's crash-state exploration (lab.crash)
        crash = getattr(step, "crash", None)
        if crash:
            sections.append(Section(kind="crash-states", data=crash,
                                    title=f"crash states of step {step.index}: {crash.get('states')} checked, "
                                          f"model {crash.get('model')}"))
    return CaseModel(id=case_id(result), name=result.name, file=result.path, description=result.description,
                     target=result.target, system=str(getattr(result, "system", "reference")), mode=result.mode,
                     swap=result.swap, verdict=Verdict(result.verdict),
                     reason=result.reason, seconds=result.seconds, attempts=attempts,
                     expected_violations=list(result.expected_violations),
                     observed_violations=list(result.observed_violations), crash_semantics=result.crash_semantics,
                     environment=result.environment, upstream=result.upstream, traceback=result.traceback,
                     console="\n".join(console.splitlines()[-CONSOLE_EXCERPT_LINES:]), rerun=rerun, steps=steps,
                     sections=sections)


def new_report(cases: list[CaseModel], *, started: str, run: dict[str, Any] | None = None,
               environment: dict[str, str] | None = None, seconds: float = 0.0) -> ReportModel:
    report = ReportModel(started=started, finished=now_utc(), seconds=seconds,
                         environment={**host_environment(), **(environment or {})}, run=dict(run or {}),
                         cases=cases)
    report.recount()
    return report


def load_report(path: Path) -> ReportModel:
    """``report.json`` (or a directory holding one); ReportError naming the file and the first problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such report (run `stonelab run` first, or name a report directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not a readable report: {err}") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise ReportError(f"{path}: schema {found!r} is not {SCHEMA!r}")
    try:
        return ReportModel.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ReportError(f"{path}: {where}: {first['msg']}") from None


def merge_reports(reports: list[ReportModel], sources: list[str]) -> ReportModel:
    """One report of several shards' cases; ReportError when a case appears in two of them."""
    seen: dict[str, str] = {}
    cases = []
    for report, source in zip(reports, sources):
        for case in report.cases:
            if case.id in seen:
                raise ReportError(f"{source}: case {case.id} is also in {seen[case.id]} (shards overlap)")
            seen[case.id] = source
            cases.append(case)
    merged = ReportModel(started=min(r.started for r in reports), finished=max(r.finished for r in reports),
                         seconds=max(r.seconds for r in reports), environment=reports[0].environment,
                         run={"merged": sources, "shards": [r.run.get("shard") for r in reports]},
                         cases=sorted(cases, key=lambda c: c.id),
                         sections=[s for r in reports for s in r.sections])
    merged.recount()
    return merged


# -- writers ---------------------------------------------------------------------------------------------------
def write_json(report: ReportModel, path: Path) -> Path:
    path.write_text(report.model_dump_json(by_alias=True, indent=2) + "\n")
    return path


def first_violation(case: CaseModel) -> str:
    """The message a CI system shows for a case: the first unexpected violation, else the reason."""
    unexpected = set(case.observed_violations) - set(case.expected_violations)
    for step in case.steps:
        for violation in step.violations:
            if violation.invariant in unexpected:
                return f"{violation.invariant}: {violation.detail}"
    return case.reason


def write_junit(report: ReportModel, path: Path) -> Path:
    from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

    suite = TestSuite("stonelab")
    for case in report.cases:
        test = TestCase(case.name, classname=f"stonelab.{case.target}.{case.system}.{case.mode}.{case.swap}", time=case.seconds)
        if case.verdict == Verdict.FAIL:
            failure = Failure(first_violation(case))
            failure.text = f"{case.reason}\nre-run: {case.rerun}"
            test.result = [failure]
        elif case.verdict == Verdict.ERROR:
            error = Error(case.reason or "not run")
            error.text = case.traceback or f"re-run: {case.rerun}"
            test.result = [error]
        elif case.verdict == Verdict.NOT_APPLICABLE:
            test.result = [Skipped(f"not applicable: {case.reason}")]
        steps = "\n".join(f"[{s.status}] {s.description} {s.command} {s.note}".rstrip() for s in case.steps)
        test.system_out = f"{case.console}\n--- steps ---\n{steps}" if case.console else steps
        suite.add_testcase(test)
    xml = JUnitXml()
    xml.add_testsuite(suite)
    xml.write(str(path), pretty=True)
    return path


def write_tap(report: ReportModel, path: Path) -> Path:
    """TAP version 13: one test line per case, a YAML diagnostic block for failures and errors."""
    lines = ["TAP version 13", f"1..{len(report.cases)}"]
    for number, case in enumerate(report.cases, 1):
        title = case.name.replace("#", "\\#")
        if case.verdict == Verdict.NOT_APPLICABLE:
            lines.append(f"ok {number} - {title} # SKIP {case.reason}")
            continue
        ok = case.verdict == Verdict.PASS
        lines.append(f"{'ok' if ok else 'not ok'} {number} - {title}")
        if not ok:
            block = {"message": first_violation(case), "severity": str(case.verdict), "target": case.target,
                     "system": case.system, "mode": case.mode, "swap": case.swap, "rerun": case.rerun, "duration_s": round(case.seconds, 2)}
            dumped = yaml.safe_dump(block, sort_keys=False, allow_unicode=True, width=1000)
            lines += ["  ---", *("  " + line for line in dumped.splitlines()), "  ..."]
    path.write_text("\n".join(lines) + "\n")
    return path


def _column(case: CaseModel) -> str:
    return f"{case.target} · {case.system} · {case.mode} · {case.swap}"


def _matrix(report: ReportModel) -> tuple[list[str], list[tuple[str, dict[str, CaseModel]]]]:
    """Columns (target/mode/swap) and rows (scenario family → the case in each column)."""
    columns = sorted({_column(c) for c in report.cases})
    rows: dict[str, dict[str, CaseModel]] = {}
    for case in report.cases:
        family = case.name.split("[", 1)[0]
        rows.setdefault(family, {})[_column(case)] = case
    return columns, sorted(rows.items())


def write_html(report: ReportModel, path: Path) -> Path:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("lab", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    columns, rows = _matrix(report)
    page = env.get_template("report.html.j2").render(report=report, columns=columns, rows=rows,
                                                     first_violation=first_violation, json=json)
    path.write_text(page)
    return path


def write_all(report: ReportModel, directory: Path) -> list[Path]:
    """Every format into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_json(report, directory / "report.json"), write_junit(report, directory / "junit.xml"),
            write_tap(report, directory / "report.tap"), write_html(report, directory / "report.html")]


def render_again(directory: Path) -> list[Path]:
    """Re-render junit.xml, report.tap and report.html from ``directory/report.json``."""
    report = load_report(directory)
    return [write_junit(report, directory / "junit.xml"), write_tap(report, directory / "report.tap"),
            write_html(report, directory / "report.html")]


def new_run_directory(base: Path, stamp: str | None = None) -> Path:
    """``base/<UTC timestamp>/`` (a suffix when two runs start in the same second), ``base/latest`` pointing at
    it (a relative symlink, replaced atomically)."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base.mkdir(parents=True, exist_ok=True)
    directory, number = base / stamp, 1
    while True:
        try:
            directory.mkdir()
            break
        except FileExistsError:
            number += 1
            directory = base / f"{stamp}-{number}"
    link = base / f".latest-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(directory.name)
    os.replace(link, base / "latest")
    return directory


# -- terminal ----------------------------------------------------------------------------------------------------
STYLE = {Verdict.PASS: "green", Verdict.FAIL: "bold red", Verdict.ERROR: "bold yellow",
         Verdict.NOT_APPLICABLE: "dim"}


def print_terminal(report: ReportModel, console=None) -> None:
    """One line per case (verdict, time, name — names never broken mid-word), the reason and the re-run command
    under each failure, then the counts. Readable at 80 columns; a re-run command is never broken (the terminal
    wraps it, a copy of it stays one command)."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    for case in report.cases:
        line = Text()
        line.append(f"{str(case.verdict).upper():5}", style=STYLE[case.verdict])
        line.append(f" {case.seconds:6.1f}s  ")
        line.append(case.name, style="bold")
        line.append(f"  {case.target}")
        if case.attempts > 1:
            line.append(f"  (attempt {case.attempts})", style="yellow")
        console.print(line, overflow="fold", crop=False)
        if case.verdict in (Verdict.FAIL, Verdict.ERROR):
            console.print(Text(f"      {first_violation(case)}"), style="red")
            if case.rerun:
                console.print(Text(f"      re-run: {case.rerun}"), style="cyan", soft_wrap=True)  # copy-pastable
    counts = report.counts
    console.print(f"{counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, {counts.get('error', 0)} errors, "
                  f"{counts.get('n/a', 0)} not applicable in {report.seconds:.1f}s")


def iter_failures(report: ReportModel) -> Iterable[CaseModel]:
    return (c for c in report.cases if c.verdict in (Verdict.FAIL, Verdict.ERROR))
