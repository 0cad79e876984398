"""`stonelab run` end to end on the host target with two tiny scenarios (one passing, one seeded to fail):
exit status, the one-line re-run command that runs exactly the failed case, report directories and `latest`,
-k, --shard (two shards cover the selection once) and `stonelab report` re-render and --merge; and the pytest
plugin collecting the same files (also under pytest-xdist)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STONELAB = [sys.executable, "-m", "stonelab.cli"]

GOOD = """name: tiny-install
description: one package in, /usr holds exactly it
tags: [default, tiny]
packages:
  a-1: {name: a, version: "1", files: {share/a: "one"}}
steps:
  - install: [a-1]
  - expect_usr: [[a-1]]
"""
# seeded failure: the expectation names a package set the install cannot give
BAD = GOOD.replace("tiny-install", "tiny-wrong-expectation").replace("[default, tiny]", "[tiny]").replace(
    "expect_usr: [[a-1]]", "expect_usr: [[]]")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("suite") / "scenarios"
    directory.mkdir()
    (directory / "tiny-install.yaml").write_text(GOOD)
    (directory / "tiny-wrong.yaml").write_text(BAD)
    return directory


def stonelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    return subprocess.run([*STONELAB, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_run_fails_with_a_rerun_line_and_writes_reports(suite, tmp_path):
    proc = stonelab("run", str(suite), "--tag", "tiny", "--jobs", "2", "--report-dir", "out", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 failed, 0 errors" in proc.stdout
    assert all(len(line) <= 80 for line in proc.stdout.splitlines() if "re-run: " not in line), proc.stdout
    rerun = next(line.split("re-run: ", 1)[1] for line in proc.stdout.splitlines() if "re-run: " in line)
    latest = tmp_path / "out" / "latest"
    assert latest.is_symlink() and (latest / "report.json").is_file()
    assert {p.name for p in latest.iterdir()} == {"report.json", "junit.xml", "report.tap", "report.html"}
    data = json.loads((latest / "report.json").read_text())
    assert {c["name"]: c["verdict"] for c in data["cases"]} == {"tiny-install": "pass",
                                                                "tiny-wrong-expectation": "fail"}

    again = stonelab(*shlex.split(rerun)[1:], "--report-dir", "out", cwd=tmp_path)   # exactly that case
    assert again.returncode == 1
    data = json.loads((tmp_path / "out" / "latest" / "report.json").read_text())
    assert [c["name"] for c in data["cases"]] == ["tiny-wrong-expectation"]
    assert len(list((tmp_path / "out").iterdir())) == 3  # two timestamped runs and latest

    (latest / "report.html").unlink()
    assert stonelab("report", "out/latest", cwd=tmp_path).returncode == 0
    assert (latest / "report.html").is_file()


def test_shards_and_merge(suite, tmp_path):
    for index in (1, 2):
        stonelab("run", str(suite), "--tag", "tiny", "--shard", f"{index}/2", "--report-dir", f"s{index}",
                 cwd=tmp_path)
    names = [json.loads((tmp_path / f"s{i}" / "latest" / "report.json").read_text())["cases"] for i in (1, 2)]
    assert [len(n) for n in names] == [1, 1]
    proc = stonelab("report", "--merge", "s1/latest", "s2/latest", "-o", "merged", cwd=tmp_path)
    assert proc.returncode == 1  # the merged run holds the failure
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert sorted(c["name"] for c in merged["cases"]) == ["tiny-install", "tiny-wrong-expectation"]
    overlap = stonelab("report", "--merge", "s1/latest", "s1/latest", "-o", "m2", cwd=tmp_path)
    assert overlap.returncode == 2 and "shards overlap" in overlap.stderr and "Traceback" not in overlap.stderr


def test_selection_errors_are_one_line(suite, tmp_path):
    for args, message in ((["-k", "nothing-like-this"], "no scenario matches"),
                          (["--shard", "3/2"], "I/N"), (["-k", "a and"], "ends too early")):
        proc = stonelab("run", str(suite), *args, "--report-dir", "x", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not (tmp_path / "x").exists()


def test_counts_are_checked(suite, tmp_path):
    """--jobs 0, a negative --jobs or --rerun-failures were accepted (found by a new-user trial)."""
    for args, message in ((["--jobs", "0"], "at least 1"), (["--jobs", "-3"], "at least 1"),
                          (["--rerun-failures", "-1"], "at least 0"), (["--jobs", "x"], "not a whole number")):
        proc = stonelab("run", str(suite), *args, "--report-dir", "x", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()


def test_pytest_collects_scenarios_and_runs_them_under_xdist(suite, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-n", "2",
                           "-k", "tiny", "--stonelab-report-dir", str(tmp_path / "rep"), "-rA"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 failed, 1 passed" in proc.stdout
    assert "re-run: stonelab run" in proc.stdout and "tiny-wrong-expectation" in proc.stdout
    data = json.loads((tmp_path / "rep" / "latest" / "report.json").read_text())
    assert sorted(c["verdict"] for c in data["cases"]) == ["fail", "pass"]
    listed = subprocess.run([sys.executable, "-m", "pytest", str(suite), "--collect-only", "-q",
                             "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "tiny-install.yaml::tiny-install" in listed.stdout
    assert "tiny-wrong.yaml::tiny-wrong-expectation" in listed.stdout


# a case that is still running when Ctrl-C arrives, however fast the machine
SLOW = GOOD.replace("tiny-install", "tiny-slow").replace("[default, tiny]", "[tiny]").replace(
    "  - expect_usr: [[a-1]]\n", "  - run: {command: sleep 8, status: 0}\n")


def test_ctrl_c_still_writes_the_report(tmp_path):
    import signal
    import time

    suite = tmp_path / "scenarios"
    suite.mkdir()
    (suite / "tiny-install.yaml").write_text(GOOD)
    (suite / "tiny-slow.yaml").write_text(SLOW)
    proc = subprocess.Popen([*STONELAB, "run", str(suite), "--tag", "tiny", "--jobs", "1", "--report-dir", "out"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)   # the first case is running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert "interrupted" in out + err and "Traceback" not in err
    data = json.loads((tmp_path / "out" / "latest" / "report.json").read_text())
    assert data["run"]["selected"] == 2 and len(data["cases"]) <= 2
