"""The run's bookkeeping without running scenarios: ETA from earlier runs' durations, the live display, the
default number of parallel cases."""
from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from lab.run import Case, Durations, Progress, default_jobs


def _case(name: str, target: str = "host") -> Case:
    return Case(SimpleNamespace(name=name, path=f"scenarios/{name}.yaml"), target)


def test_durations_estimate_from_earlier_runs(tmp_path):
    durations = Durations(tmp_path / "d.json")
    assert durations.estimate("x", default=60.0) == 60.0
    for seconds in (10, 20, 30, 40, 50, 60):
        durations.record("x", seconds)
    durations.save()
    again = Durations(tmp_path / "d.json")
    assert again.estimate("x") == 40.0       # the mean of the last five
    (tmp_path / "d.json").write_text("{broken")
    assert Durations(tmp_path / "d.json").estimate("x", default=7.0) == 7.0


def test_progress_shows_running_steps_and_eta(tmp_path):
    durations = Durations(tmp_path / "d.json")
    cases = [_case("slow"), _case("fast")]
    durations.record(cases[0].id, 600)
    durations.record(cases[1].id, 60)
    console = Console(record=True, width=80, color_system=None)
    progress = Progress(cases, durations, jobs=2, console=console)
    progress.begin(cases[0])
    progress.step(cases[0], 2, "crash at blit.mid during install [a-2]")
    console.print(progress)
    text = console.export_text()
    assert "slow · step 2: crash at blit.mid" in text
    assert "0/2" in text and "ETA 5:" in text      # (600 + 60) s of work on 2 jobs: about 5.5 minutes


def test_default_jobs_bounded_by_cores_and_memory():
    assert default_jobs([_case("a")]) >= 1
    assert default_jobs([_case("a", "vm")]) <= default_jobs([_case("a")])
