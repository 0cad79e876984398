"""A run of many cases: selection, parallel guests, live progress, re-runs of failures, reports.

A *case* is one scenario cell on one target (``lab.scenario`` expands matrix files into cells). Cases run in a
thread pool (``--jobs``): each VM case owns its QEMU guest, each host case its temporary root, so they share
nothing but the accelerator probe. Progress is a rich ``Live`` display: one line per running case (its step and
elapsed time) and an overall line with an ETA from the durations of earlier runs
(``$XDG_CACHE_HOME/stonelab/durations.json``, the mean of the last few runs of each case).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from lab.report import (CaseModel, ReportModel, case_from_result, new_report, new_run_directory, now_utc,
                        print_terminal, write_all)
from lab.selection import SelectionError, parse_shard, select, shard
from lab.target import TargetKind
from lab.verdict import Verdict
from stonelab.errors import StonelabError
from vm.log import get_logger

log = get_logger("lab.run")
GUEST_MEMORY_GIB = 1.25   # a guest's 1 GiB plus QEMU's own


@dataclass(frozen=True)
class Case:
    """One scenario cell and where it runs."""

    scenario: object          # lab.scenario.Scenario
    target: str

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def id(self) -> str:
        return f"{Path(self.scenario.path).stem}::{self.scenario.name}@{self.target}"


@dataclass
class RunOptions:
    target: str | None = None
    kernel: str | None = None
    accel: str = "auto"
    jobs: int | None = None
    rerun_failures: int = 0
    shell_on_failure: bool = False
    snapshots: bool = True
    personality: str | None = None
    report_dir: Path = Path("reports")
    shard: str | None = None
    argv: list[str] = field(default_factory=list)
    rerun_base: list[str] = field(default_factory=lambda: ["stonelab", "run"])


def _files(paths: Sequence[str | Path]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif path.is_file():
            files.append(path)
        else:
            raise StonelabError(f"{path}: no such scenario file or directory")
    return files


def collect_cases(paths: Sequence[str | Path], *, keyword: str | None = None, tags: Sequence[str] = (),
                  target: str | None = None, shard_spec: str | None = None) -> list[Case]:
    """The cases of ``paths`` (files or directories of ``*.yaml``) that carry one of ``tags`` and match
    ``keyword``, then the ``shard_spec`` ("I/N") slice of them. StonelabError when nothing is selected."""
    from lab.scenario import load_scenarios

    cells = [cell for file in _files(paths) for cell in load_scenarios(file)]
    chosen = select(cells, name=lambda s: s.name, tags=lambda s: s.tags, keyword=keyword, wanted_tags=tags)
    cases = [Case(s, str(s.target if s.target != TargetKind.ANY else (target or TargetKind.HOST))) for s in chosen]
    if shard_spec:
        index, total = parse_shard(shard_spec)
        cases = shard(cases, index, total, key=lambda c: c.id)
    elif not cases:
        what = " and ".join(filter(None, [f"tag {', '.join(tags)}" if tags else "", f"-k {keyword!r}" if keyword
                                          else ""]))
        raise SelectionError(f"no scenario matches {what or 'the given paths'}")
    return cases


def default_jobs(cases: Sequence[Case]) -> int:
    """What this machine allows: one case per core; VM cases also bounded by available memory."""
    cores = os.cpu_count() or 1
    if not any(c.target == TargetKind.VM for c in cases):
        return cores
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) / (1 << 20)
    except (OSError, KeyError, ValueError):
        available = GUEST_MEMORY_GIB
    return max(1, min(cores, int(available // GUEST_MEMORY_GIB)))


class Durations:
    """Seconds each case took in earlier runs (for the ETA), in the user's cache; unreadable history is empty."""

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = path or base / "stonelab" / "durations.json"
        try:
            self.data: dict[str, list[float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def estimate(self, case_key: str, default: float = 60.0) -> float:
        runs = self.data.get(case_key)
        return sum(runs) / len(runs) if runs else default

    def record(self, case_key: str, seconds: float) -> None:
        self.data[case_key] = (self.data.get(case_key, []) + [round(seconds, 2)])[-5:]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("could not save case durations to %s: %s", self.path, err)


class Progress:
    """The live display: a line per running case (name, step, elapsed) and the overall line with the ETA."""

    def __init__(self, cases: Sequence[Case], durations: Durations, jobs: int, console):
        from rich.live import Live

        self.console = console
        self.durations = durations
        self.jobs = jobs
        self.total = len(cases)
        self.remaining = {c.id: durations.estimate(c.id) for c in cases}
        self.running: dict[str, tuple[str, str, float]] = {}   # id -> (name, step, started)
        self.done = 0
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.live = Live(self, console=console, refresh_per_second=2, transient=True, redirect_stderr=True)

    def __rich__(self):
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column(overflow="ellipsis", no_wrap=True)
        now = time.monotonic()
        with self.lock:
            for name, step, started in self.running.values():
                table.add_row(f"[cyan]{_clock(now - started)}[/]", f"{name} · {step}")
            left = sum(max(0.0, self.remaining[n] - (now - s)) for n, (_, _, s) in self.running.items())
            left += sum(v for n, v in self.remaining.items() if n not in self.running)
            table.add_row(f"[bold]{self.done}/{self.total}[/]",
                          f"elapsed {_clock(now - self.started)} · ETA {_clock(left / max(1, self.jobs))} "
                          "(from earlier runs)")
        return table

    def begin(self, case: Case) -> None:
        with self.lock:
            self.running[case.id] = (case.name, "starting", time.monotonic())

    def step(self, case: Case, index: int, description: str) -> None:
        with self.lock:
            if case.id in self.running:
                self.running[case.id] = (case.name, f"step {index}: {description}", self.running[case.id][2])

    def end(self, case: Case, result: CaseModel) -> None:
        with self.lock:
            self.running.pop(case.id, None)
            self.remaining.pop(case.id, None)
            self.done += 1
        from rich.text import Text

        style = {"pass": "green", "fail": "bold red", "error": "bold yellow"}.get(str(result.verdict), "dim")
        line = Text()
        line.append(f"{str(result.verdict).upper():5}", style=style)
        line.append(f" {result.seconds:6.1f}s  {result.name}")
        self.console.print(line)
        if result.verdict in (Verdict.FAIL, Verdict.ERROR):
            self.console.print(Text(f"      re-run: {result.rerun}", style="cyan"), soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_cases(cases: Sequence[Case], options: RunOptions, console=None) -> ReportModel:
    """Run ``cases`` and write the reports; the report (``.passed`` decides the exit status)."""
    from rich.console import Console

    from lab.cli import rerun_command

    console = console or Console(stderr=False)
    jobs = 1 if options.shell_on_failure else max(1, options.jobs or default_jobs(cases))
    if options.shell_on_failure and any(c.target != TargetKind.VM for c in cases):
        raise StonelabError("--shell-on-failure opens a guest shell on the failed system's disk: use --target vm")
    keep = Path(tempfile.mkdtemp(prefix="stonelab-failed-")) if options.shell_on_failure else None
    factories = _vm_factories(cases, options, keep)
    durations = Durations()
    started, clock = now_utc(), time.monotonic()
    directory = new_run_directory(options.report_dir)
    progress = Progress(cases, durations, jobs, console)
    results: dict[str, CaseModel] = {}
    stopping = threading.Event()

    def one(case: Case) -> CaseModel:
        from lab.crash.explore import ExploreOptions
        from lab.runner import run_scenario

        attempts = 0
        while True:
            attempts += 1
            progress.begin(case)
            crash = ExploreOptions(out_dir=directory / "crash" / case.name)  # crash engine's reproducers
            result = run_scenario(case.scenario, target=case.target, vm_factory=factories.get(case.target),
                                  crash_defaults=crash, on_step=lambda i, d: progress.step(case, i, d))
            model = case_from_result(result, attempts=attempts,
                                     rerun=rerun_command(options.rerun_base, result.path, result.name))
            if (model.verdict not in (Verdict.FAIL, Verdict.ERROR) or attempts > options.rerun_failures
                    or stopping.is_set()):
                return model
            log.info("%s: %s, running it again (attempt %d)", case.name, model.verdict, attempts + 1)

    try:
        console.print(f"stonelab: {len(cases)} cases, {jobs} at a time"
                      + (f", shard {options.shard}" if options.shard else ""))
        with progress.live, ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="case") as pool:
            pending: dict[Future, Case] = {pool.submit(one, case): case for case in cases}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        case = pending.pop(future)
                        model = future.result()
                        results[case.id] = model
                        durations.record(case.id, model.seconds)
                        progress.end(case, model)
                        if keep is not None and model.verdict in (Verdict.FAIL, Verdict.ERROR):
                            progress.live.stop()
                            _shell_on_disk(keep, options, model, console)
                            progress.live.start()
            except KeyboardInterrupt:
                # before the pool's exit waits for the running cases: stop their guests so they end now
                console.print("stonelab: interrupted; stopping the guests, writing the report of the finished cases")
                stopping.set()
                for future in pending:
                    future.cancel()
                while not all(future.done() for future in pending):  # a case may power a guest on again
                    _stop_guests()
                    time.sleep(0.2)
                raise
    finally:
        durations.save()
        report = new_report([results[c.id] for c in cases if c.id in results], started=started,
                            seconds=time.monotonic() - clock, environment=_environment(results),
                            run={"argv": " ".join(options.argv), "jobs": jobs, "shard": options.shard or "",
                                 "selected": len(cases)})
        write_all(report, directory)
        if keep is not None:
            import shutil
            shutil.rmtree(keep, ignore_errors=True)
    print_terminal(report, console)
    console.print(f"reports: {directory} ({options.report_dir / 'latest'})")
    return report


def _stop_guests() -> None:
    """SIGKILL the QEMU processes this process started (its children), so running cases end now."""
    import signal

    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _environment(results: dict[str, CaseModel]) -> dict[str, str]:
    envs = sorted({c.environment for c in results.values() if c.environment})
    return {"targets": " | ".join(envs)} if envs else {}


def _vm_factories(cases: Sequence[Case], options: RunOptions, keep: Path | None) -> dict[str, object]:
    if not any(c.target == TargetKind.VM for c in cases):
        return {}
    from lab.vm_target import vm_target_factory  # one accelerator probe for the whole run
    return {str(TargetKind.VM): vm_target_factory(options.kernel, options.accel, options.personality,
                                                  snapshots=options.snapshots, keep=keep)}


def _shell_on_disk(keep: Path, options: RunOptions, case: CaseModel, console) -> None:
    """An interactive guest shell with the failed case's system disk as /dev/vda (its root is /dev/vda2)."""
    disks = sorted(keep.glob("*/sut.img"), key=lambda p: p.stat().st_mtime)
    if not disks:
        console.print(f"stonelab: no system disk was kept for {case.name} (it failed before its guest started)")
        return
    argv = [sys.executable, "-m", "stonelab.cli", "vm", "shell", "--disk", str(disks[-1]), "--accel", options.accel]
    if options.kernel:
        argv += ["--kernel", options.kernel]
    console.print(f"stonelab: {case.name} failed: a shell in a guest with its system disk (/dev/vda2 is the "
                  "root under test: `mount /dev/vda2 /mnt`); `exit` goes on with the run")
    subprocess.run(argv)
    for disk in disks:
        disk.unlink(missing_ok=True)
