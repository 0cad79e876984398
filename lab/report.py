"""Reports of a run: terminal (rich), JSON, JUnit XML (junitparser) and one self-contained HTML page."""
from __future__ import annotations

import html
import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite
from rich.console import Console
from rich.table import Table

from lab.runner import ScenarioResult
from lab.verdict import Verdict


@dataclass
class RunReport:
    results: list[ScenarioResult]
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    environment: dict[str, str] = field(default_factory=lambda: {
        "host_kernel": platform.release(), "python": platform.python_version(), "machine": platform.machine()})

    @property
    def passed(self) -> bool:
        return all(r.verdict in (Verdict.PASS, Verdict.NOT_APPLICABLE) for r in self.results)

    def counts(self) -> dict[str, int]:
        counts = {str(v): 0 for v in Verdict}
        for r in self.results:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        return counts


def to_dict(report: RunReport) -> dict:
    return {
        "started": report.started,
        "environment": report.environment,
        "counts": report.counts(),
        "scenarios": [dict(asdict(r), observed_violations=r.observed_violations) for r in report.results],
    }


def write_json(report: RunReport, path: Path) -> Path:
    path.write_text(json.dumps(to_dict(report), indent=2) + "\n")
    return path


def write_junit(report: RunReport, path: Path) -> Path:
    suite = TestSuite("stonelab")
    for result in report.results:
        case = TestCase(result.name, classname=f"stonelab.{result.target}.{result.mode}", time=result.seconds)
        if result.verdict == Verdict.FAIL:
            case.result = [Failure(result.reason)]
        elif result.verdict == Verdict.ERROR:
            error = Error(result.reason or "not run")
            if result.traceback:
                error.text = result.traceback
            case.result = [error]
        elif result.verdict == Verdict.NOT_APPLICABLE:
            case.result = [Skipped(f"not applicable: {result.reason}")]
        case.system_out = "\n".join(
            f"[{s.status}] {s.description} {s.command} {s.note}".rstrip() for s in result.steps)
        suite.add_testcase(case)
    xml = JUnitXml()
    xml.add_testsuite(suite)
    xml.write(str(path), pretty=True)
    return path


def print_terminal(report: RunReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="stonelab", show_lines=False)
    for column in ("scenario", "target", "mode", "verdict", "violations (expected)", "why"):
        table.add_column(column, overflow="fold")
    style = {Verdict.PASS: "green", Verdict.FAIL: "red", Verdict.ERROR: "yellow", Verdict.NOT_APPLICABLE: "dim"}
    for r in report.results:
        table.add_row(r.name, r.target, r.mode, f"[{style[r.verdict]}]{r.verdict}[/]",
                      f"{', '.join(r.observed_violations) or '-'} ({', '.join(r.expected_violations) or '-'})",
                      r.reason)
    console.print(table)
    counts = report.counts()
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
                  f"{counts['n/a']} not applicable")
    for r in report.results:
        if r.traceback:
            console.print(f"[yellow]{r.name}: the lab broke[/]\n{r.traceback}", markup=True, highlight=False)


def _css(verdict: str) -> str:
    return "na" if verdict == Verdict.NOT_APPLICABLE else str(verdict)


def write_html(report: RunReport, path: Path) -> Path:
    esc = html.escape
    rows = []
    for r in report.results:
        steps = "".join(
            f"<tr class='{esc(s.status)}'><td>{s.index}</td><td>{esc(s.description)}</td><td>{esc(s.status)}</td>"
            f"<td><code>{esc(s.command)}</code></td><td>{esc(s.note)}</td>"
            f"<td>{'<br>'.join('<b>' + esc(v.invariant) + '</b>: ' + esc(v.detail) for v in s.violations)}</td>"
            f"<td>{'<br>'.join(esc(k + ': ' + e) for k, e in s.evidence.items())}</td>"
            f"<td>{s.seconds:.2f}s</td></tr>" for s in r.steps)
        rows.append(
            f"<details class='{_css(r.verdict)}'><summary><b>{esc(r.name)}</b> — {esc(r.verdict)} — {esc(r.reason)}"
            f"</summary><p>{esc(r.description)}</p><p>target {esc(r.target)} ({esc(r.environment)}), mode {esc(r.mode)}, swap "
            f"{esc(r.swap)}; crashes: {esc(r.crash_semantics)}</p><p>expected violations: "
            f"{esc(', '.join(r.expected_violations) or 'none')}; observed: "
            f"{esc(', '.join(r.observed_violations) or 'none')}</p>"
            f"<table><tr><th>#</th><th>step</th><th>status</th><th>command</th><th>note</th><th>violations</th>"
            f"<th>held (evidence)</th><th>time</th></tr>{steps}</table>"
            + (f"<p>the lab itself broke:</p><pre>{esc(r.traceback)}</pre>" if r.traceback else "")
            + "</details>")
    counts = report.counts()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>stonelab report</title><style>
body{{font-family:sans-serif;margin:2em;max-width:90em}} table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}} code{{font-size:.85em}}
details{{margin:.5em 0;padding:.5em;border-left:.4em solid #999}} details.pass{{border-color:#2a2}}
details.fail{{border-color:#c22}} details.error{{border-color:#c90}} tr.crashed{{background:#fff3e0}}
tr.failed{{background:#fde}}</style></head><body>
<h1>stonelab report</h1><p>{esc(report.started)} — {counts['pass']} passed, {counts['fail']} failed,
{counts['error']} errors, {counts['n/a']} not applicable — host kernel {esc(report.environment['host_kernel'])}</p>
{''.join(rows)}</body></html>"""
    path.write_text(page)
    return path


def write_all(report: RunReport, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write_json(report, directory / "report.json"), write_junit(report, directory / "junit.xml"),
            write_html(report, directory / "report.html")]
