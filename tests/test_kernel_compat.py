"""Kernel compatibility: the trace of what the reference uses, the probe of a running kernel, and the gaps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.kernel.gaps import analyse, documented_profile, probed_profile
from lab.kernel.probe import build_probe, filesystem_of, probe_here
from lab.kernel.trace import Feature, Trace, parse_strace, trace_reference
from tests.conftest import shared_file

STRACE = """\
100 renameat2(AT_FDCWD, "/r/.moss/root/staging/usr", AT_FDCWD, "/r/usr", RENAME_EXCHANGE) = 0
100 openat(AT_FDCWD, "/r/.moss", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 3
101 linkat(AT_FDCWD, "/r/.moss/assets/v2/aa/bb/cc/aabbcc", 5, "bin/x", 0 <unfinished ...>
100 syncfs(3)                         = 0
101 <... linkat resumed>)             = -1 EXDEV (Invalid cross-device link)
100 ioctl(4, BTRFS_IOC_CLONE or FICLONE, 3) = -1 EOPNOTSUPP (Operation not supported)
100 ioctl(1, TCGETS, 0x7ffd) = -1 ENOTTY (Inappropriate ioctl for device)
100 unshare(CLONE_NEWNS)              = 0
100 mount(NULL, "/", NULL, MS_REC|MS_PRIVATE, NULL) = 0
100 rseq(0x7f, 0x20, 0, 0x53053053) = 0
"""


def test_parse_strace_reduces_calls_to_features():
    features: dict[str, Feature] = {}
    parse_strace(STRACE, "install", features)
    assert features["renameat2:RENAME_EXCHANGE"].calls == 1
    assert features["linkat:0"].errors == {"EXDEV": 1}  # joined across <unfinished>/<resumed>
    assert features["openat:O_DIRECTORY"].category == "transaction"
    assert features["ioctl:FICLONE"].errors == {"EOPNOTSUPP": 1}
    assert features["ioctl:TCGETS"].category == "runtime"
    assert features["mount:MS_PRIVATE|MS_REC"].phases == ["install"]
    assert "unshare:CLONE_NEWNS" in features and features["rseq"].category == "runtime"


@pytest.fixture(scope="module")
def trace() -> Trace:
    import shutil
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    return trace_reference()


def test_trace_shows_what_each_swap_strategy_needs(trace: Trace):
    exchange = trace.feature("renameat2:RENAME_EXCHANGE")
    assert exchange is not None and all(p.startswith("exchange:") for p in exchange.phases)
    assert {"exchange:install", "exchange:upgrade", "exchange:rollback"} <= set(exchange.phases)
    renames = trace.feature("rename")
    assert renames is not None and any(p.startswith("symlink:") for p in renames.phases)
    for key in ("syncfs", "fsync", "flock:LOCK_EX|LOCK_NB", "linkat:0", "symlinkat", "prlimit64:RLIMIT_NOFILE"):
        assert trace.feature(key) is not None, f"{key} not traced"
    assert Trace.from_json(trace.to_json()).feature("syncfs").calls == trace.feature("syncfs").calls


def test_documented_asterinas_gaps(trace: Trace):
    profile = documented_profile("asterinas-0.18.1", shared_file("data").parent / "data")
    gaps = {g.feature: g for g in analyse(trace, profile, "ext2")}
    assert gaps["renameat2:RENAME_EXCHANGE"].result == "EINVAL"
    assert gaps["renameat2:RENAME_EXCHANGE"].severity == "blocker" and "--swap symlink" in gaps[
        "renameat2:RENAME_EXCHANGE"].workaround
    assert gaps["mount:vfat"].result == "ENODEV"
    assert "newfstatat" not in gaps  # Asterinas calls it fstatat: compared by number, not by name
    assert "rename" not in gaps and "linkat:0" not in gaps
    on_tmpfs = {g.feature for g in analyse(trace, profile, "tmpfs")}
    assert "renameat2:RENAME_EXCHANGE" not in on_tmpfs


def test_probe_this_kernel(tmp_path: Path):
    build_probe()  # needs gcc and a static libc
    log = probe_here([tmp_path])
    fs = filesystem_of(tmp_path)
    assert f"STONELAB-PROBE {fs} renameat2_exchange ok" in log
    assert f"STONELAB-PROBE {fs} done" in log
    assert not list(tmp_path.iterdir()), "the probe left its work directory behind"
    profile = probed_profile("host", log)
    assert profile.result("renameat2:RENAME_EXCHANGE", fs) == "ok"
    assert profile.result("unshare:CLONE_NEWNS", fs) == "ok"


def test_probed_refusal_becomes_a_gap(trace: Trace):
    log = ("STONELAB-PROBE ext2 renameat2_exchange fail EINVAL 22 swap\n"
           "STONELAB-PROBE ext2 linkat ok\nSTONELAB-PROBE ext2 done\n")
    gaps = {g.feature: g for g in analyse(trace, probed_profile("asterinas", log), "ext2")}
    assert gaps["renameat2:RENAME_EXCHANGE"].evidence.startswith("probed")
    assert "linkat:0" not in gaps


def test_kernel_cli_errors_are_one_line(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stonelab.cli", "kernel", *args], capture_output=True,
                              text=True)
    for args, needle in ((["gaps", "--profile", "plan9", "--trace", str(tmp_path / "t.json")], "t.json"),
                         (["gaps", "--probe-log", str(tmp_path / "none.log"), "--trace", str(tmp_path)], "")):
        result = run(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    result = run("gaps", "--profile", "asterinas-0.18.1", "--trace", str(bad))
    assert result.returncode == 2 and "not a stonelab kernel trace" in result.stderr
