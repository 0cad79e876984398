"""Kernel compatibility: the traced requirements, the semantic probe (and a kernel that ignores a flag), profiles
and the gaps between them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.kernel.gaps import analyse
from lab.kernel.probe import Shim, build_probe, filesystem_of, probe_here
from lab.kernel.profile import PROJECT, load_profile, probed_profile
from lab.kernel.trace import Feature, Trace, parse_strace
from tests.conftest import shared_file

REQUIREMENTS = PROJECT / "compat" / "requirements.json"
STRACE = """\
100 renameat2(AT_FDCWD, "/r/.moss/root/staging/usr", AT_FDCWD, "/r/usr", RENAME_EXCHANGE) = 0
100 openat(AT_FDCWD, "/r/.moss", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 3
101 linkat(AT_FDCWD, "/r/.moss/assets/v2/aa/bb/cc/aabbcc", 5, "bin/x", 0 <unfinished ...>
100 syncfs(3)                         = 0
101 <... linkat resumed>)             = -1 EXDEV (Invalid cross-device link)
100 ioctl(4, BTRFS_IOC_CLONE or FICLONE, 3) = -1 EOPNOTSUPP (Operation not supported)
100 ioctl(1, TCGETS, 0x7ffd) = -1 ENOTTY (Inappropriate ioctl for device)
100 unshare(CLONE_NEWNS|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWPID|CLONE_NEWNET) = 0
100 mount(NULL, "/", NULL, MS_REC|MS_PRIVATE, NULL) = 0
100 mount("tmpfs", "/x/tmp", "tmpfs", MS_NOSUID|MS_NODEV, "mode=1777") = 0
100 openat(5, "empty", O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0644) = 6
100 openat(5, ".", O_WRONLY|O_TMPFILE|O_CLOEXEC, 0600) = -1 EOPNOTSUPP (Operation not supported)
100 openat(AT_FDCWD, "/sys/dev/block/254:2/partition", O_RDONLY|O_CLOEXEC) = 3
100 prctl(PR_SET_PDEATHSIG, SIGKILL) = 0
100 rseq(0x7f, 0x20, 0, 0x53053053) = 0
"""


def test_parse_strace_reduces_calls_to_features():
    features: dict[str, Feature] = {}
    parse_strace(STRACE, "install", features)
    assert features["renameat2:RENAME_EXCHANGE"].calls == 1
    assert features["linkat"].errors == ["EXDEV"]  # joined across <unfinished>/<resumed>, flags 0 → no detail
    assert features["openat:O_DIRECTORY"].category == "transaction"
    assert features["ioctl:FICLONE"].errors == ["EOPNOTSUPP"]
    assert features["ioctl:TCGETS"].category == "runtime"
    assert features["mount:MS_PRIVATE|MS_REC"].phases == ["install"]
    assert "mount:tmpfs:MS_NODEV|MS_NOSUID" in features
    assert "unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS" in features  # sorted flags
    assert "openat:O_CREAT|O_EXCL|O_NOFOLLOW" in features and features["openat:O_TMPFILE"].errors == ["EOPNOTSUPP"]
    assert features["sysfs:block"].category == "transaction"
    assert "prctl:PR_SET_PDEATHSIG" in features and features["rseq"].category == "runtime"


def _results(log: str, fs: str) -> dict[str, str]:
    profile = probed_profile("here", "", log, "probe output")
    return {key: per_fs[fs].short() for key, per_fs in profile.results.items() if fs in per_fs}


@pytest.fixture(scope="module")
def here_log(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("probe")
    build_probe()  # needs gcc and a static libc (Debian libc6-dev)
    log = probe_here([directory])
    assert not list(directory.iterdir()), "the probe left its work directory behind"
    return log, filesystem_of(directory)


def test_probe_checks_semantics_on_this_kernel(here_log):
    log, fs = here_log
    assert f"STONELAB-PROBE {fs} done" in log
    results = _results(log, fs)
    for key in ("renameat2:RENAME_EXCHANGE", "renameat2:RENAME_NOREPLACE", "rename", "linkat", "symlinkat",
                "openat:O_CREAT|O_EXCL", "flock:LOCK_EX|LOCK_NB", "unshare:CLONE_NEWNS", "unshare:CLONE_NEWPID",
                "unshare:CLONE_NEWNET", "unshare:CLONE_NEWUTS", "unshare:CLONE_NEWIPC", "unshare:CLONE_NEWUSER",
                "pivot_root", "mount:MS_BIND", "mount:MS_BIND|MS_RDONLY|MS_REMOUNT", "fsync", "syncfs"):
        assert results[key] == "supported", (key, results.get(key))
    assert "same inode" in log and "contents checked" in log


@pytest.mark.parametrize("shim, key, evidence", [
    (Shim(316, 4, 0x2), "renameat2:RENAME_EXCHANGE", "the flag was ignored"),        # renameat2 without EXCHANGE
    (Shim(316, 4, 0x1), "renameat2:RENAME_NOREPLACE", "replaced an existing name"),  # … without NOREPLACE
    (Shim(272, 0, 0x20000000), "unshare:CLONE_NEWPID", "not pid 1"),                # unshare without NEWPID
    (Shim(272, 0, 0x40000000), "unshare:CLONE_NEWNET", "unchanged"),                # unshare without NEWNET
    (Shim(165, 3, 0x1), "mount:MS_BIND|MS_RDONLY|MS_REMOUNT", "read-only bind"),    # mount without MS_RDONLY
])
def test_a_kernel_that_ignores_a_flag_is_caught(tmp_path: Path, here_log, shim: Shim, key: str, evidence: str):
    _, fs = here_log
    log = probe_here([tmp_path], build_probe(shim=shim))
    line = next(line for line in log.splitlines() if f" {key} " in line)
    assert " wrong-semantics -- " in line and evidence in line, line
    assert _results(log, fs)["rename"] == "supported"  # the shim touches nothing else


def test_asterinas_profile_cites_upstream_sources():
    profile = load_profile("asterinas-0.18.1", shared_data=shared_file("data"))
    for key, per_fs in profile.results.items():
        for result in per_fs.values():
            assert result.source and all(s.startswith("kernel/") for s in result.source), key
            assert result.evidence, key
    exchange = profile.result("renameat2:RENAME_EXCHANGE", "ext2")
    assert exchange.errno == "EINVAL" and "fs_impls/ext2" in " ".join(exchange.source)
    assert profile.result("renameat2:RENAME_EXCHANGE", "tmpfs").ok
    assert profile.result("copy_file_range", "ext2").errno == "ENOSYS"
    assert profile.result("newfstatat", "ext2") is None  # Asterinas calls it fstatat: compared by number
    assert profile.result("unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS", "ext2").errno \
        == "EINVAL"


def _trace(*keys: str) -> Trace:
    return Trace([Feature(k, k.split(":")[0], k.partition(":")[2], "transaction", ["install"]) for k in keys],
                 ["install"], "test")


def test_every_semantic_failure_of_a_probe_log_is_a_gap():
    keys = ["renameat2:RENAME_EXCHANGE", "openat:O_TMPFILE", "linkat", "unshare:CLONE_NEWPID", "setxattr",
            "fsync"]
    lines = [f"STONELAB-PROBE ext2 {keys[0]} errno EINVAL 22 -- refused",
             f"STONELAB-PROBE ext2 {keys[1]} errno EOPNOTSUPP 95 -- refused",
             f"STONELAB-PROBE ext2 {keys[2]} wrong-semantics -- another inode",
             f"STONELAB-PROBE ext2 {keys[3]} wrong-semantics -- not pid 1",
             f"STONELAB-PROBE ext2 {keys[4]} errno EOPNOTSUPP 95 -- refused",
             f"STONELAB-PROBE ext2 {keys[5]} wrong-semantics -- bitmaps", "STONELAB-PROBE ext2 rename supported -- ok",
             "STONELAB-PROBE ext2 done"]
    profile = probed_profile("ext2-kernel", "", "\n".join(lines), "log")
    trace = _trace("renameat2:RENAME_EXCHANGE", "openat:O_TMPFILE", "linkat", "setxattr", "fsync", "rename",
                   "unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS")
    gaps = {g.feature: g for g in analyse(trace, profile, "ext2")}
    assert set(gaps) == {"renameat2:RENAME_EXCHANGE", "openat:O_TMPFILE", "linkat", "setxattr", "fsync",
                         "unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS"}
    assert gaps["linkat"].result == "wrong-semantics" and "another inode" in gaps["linkat"].evidence
    unshare = gaps["unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS"]
    assert unshare.severity == "blocker" and unshare.evidence.startswith("unshare:CLONE_NEWPID")
    assert gaps["openat:O_TMPFILE"].severity == "benign" and "falls back" in gaps["openat:O_TMPFILE"].consequence


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stonelab.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT)


def test_kernel_cli_errors_are_one_line(tmp_path: Path):
    cases = [
        (["kernel", "gaps", "--profile", "plan9", "--trace", str(tmp_path / "t.json")], "plan9"),
        (["kernel", "gaps", "--probe-log", str(tmp_path / "none.log")], "none.log"),
        (["kernel", "probe", "--kernel", str(tmp_path / "vmlinuz-none")], "vmlinuz-none"),
        (["kernel", "probe", "--kernel", str(PROJECT / "lab/kernel/probe.c"), "--boot", "multiboot"], "multiboot"),
        (["kernel", "gaps", "--profile", "asterinas-0.18.1", "--fs", "btrfs"], "btrfs"),
    ]
    for args, needle in cases:
        result = _cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    result = _cli("kernel", "gaps", "--profile", "asterinas-0.18.1", "--trace", str(bad))
    assert result.returncode == 2 and "not a stonelab requirements file" in result.stderr


def test_malformed_profiles_and_traces_are_one_line(tmp_path: Path):
    """Found by trying the lab as a new user: these were UnicodeDecodeError/AttributeError tracebacks."""
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x00\xff\xfe")
    shapes = {"list.json": {"name": "x", "results": [1, 2]}, "str.json": {"name": "x", "results": {"chroot": "x"}}}
    for name, data in shapes.items():
        (tmp_path / name).write_text(json.dumps(data))
    truncated = tmp_path / "truncated.json"
    truncated.write_text((PROJECT / "compat/profiles/linux-6.1.0-57-amd64.json").read_text()[:3000])
    cases = [(["kernel", "gaps", "--profile", str(path)], path.name)
             for path in (binary, tmp_path / "list.json", tmp_path / "str.json", truncated)]
    cases += [(["kernel", "gaps", "--profile", "asterinas-0.18.1", "--trace", str(binary)], binary.name),
              (["run", "--personality", str(binary), str(PROJECT / "scenarios/install-upgrade-rollback.yaml")],
               binary.name),
              (["run", "--target", "host", "--personality", "asterinas-0.18.1",
                str(PROJECT / "scenarios/install-upgrade-rollback.yaml")], "--target vm")]
    for args, needle in cases:
        result = _cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_rerun_line_repeats_the_personality():
    import argparse
    from lab.cli import _rerun_base
    args = argparse.Namespace(target="vm", kernel=None, accel="auto", personality="asterinas-0.18.1")
    assert _rerun_base(args)[-2:] == ["--personality", "asterinas-0.18.1"]


def test_fs_values_are_checked():
    result = _cli("kernel", "probe", "--kernel", "/nonexistent", "--fs", "ext2,zfs")
    assert result.returncode == 2 and "zfs" in result.stderr and "tmpfs,ext2,ext4,vfat" in result.stderr


def test_boot_protocol_headers_are_checked(tmp_path: Path):
    from lab.kernel.boot import check_image
    from stonelab.errors import StonelabError
    from tests.test_vm_boot_modes import multiboot_kernel
    image = multiboot_kernel(tmp_path / "mb.bin", b"x", 0x10)
    check_image(image, "multiboot")
    for boot in ("linux", "uefi"):
        with pytest.raises(StonelabError, match="mb.bin"):
            check_image(image, boot)


@pytest.mark.vm
def test_probe_booted_on_the_linux_guest_agrees_with_the_linux_profile(kernel):
    from lab.kernel.boot import probe_kernel
    committed = sorted((PROJECT / "compat" / "profiles").glob(f"linux-{kernel.release}.json"))
    if not committed:
        pytest.skip(f"no committed profile for kernel {kernel.release} (regenerate: stonelab kernel probe --kernel "
                    f"{kernel.image})")
    profile = load_profile(str(committed[0]))
    run = probe_kernel(kernel.image, filesystems=["tmpfs", "ext2"])
    assert run.profile.name == profile.name and "incomplete" not in run.profile.facts, run.profile.facts
    for fs in ("tmpfs", "ext2", "*"):
        probed = {k: r.short() for k, per_fs in run.profile.results.items() for f, r in per_fs.items() if f == fs}
        expected = {k: r.short() for k, per_fs in profile.results.items() for f, r in per_fs.items() if f == fs}
        assert probed == expected, fs
    assert profile.exact("renameat2:RENAME_EXCHANGE", "ext2").ok and not profile.exact("durability", "tmpfs").ok


CALLS = """\
import ctypes, os, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
d = tempfile.mkdtemp(dir=sys.argv[1])
for name in "ab":
    open(os.path.join(d, name), "w").write(name)
def call(*args):
    return 0 if libc.syscall(*args) >= 0 else ctypes.get_errno()
out = {"renameat2_exchange": call(316, -100, f"{d}/a".encode(), -100, f"{d}/b".encode(), 2),
       "renameat2_plain": call(316, -100, f"{d}/a".encode(), -100, f"{d}/c".encode(), 0),
       "copy_file_range": call(326, -1, None, -1, None, 1, 0)}
r, w = os.pipe()
if os.fork() == 0:
    os.write(w, bytes([call(272, 0x20000000), call(272, 0x20000)]))
    os._exit(0)
os.wait()
out["unshare_newpid"], out["unshare_newns"] = os.read(r, 2)
print(out)
"""


def test_emulation_returns_the_profiles_errno_for_calls_linux_supports(tmp_path: Path):
    import ast
    import errno
    shared_file("data")
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    native = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True)
    from lab.kernel.emulate import plan
    plan_file = tmp_path / "plan.json"  # what a guest gets: the plan resolved here, no profile or headers needed
    plan_file.write_text(plan(load_profile("asterinas-0.18.1", shared_data=shared_file("data")), "ext2").to_json())
    seen = []
    for source in (["--profile", "asterinas-0.18.1"], ["--plan", str(plan_file)]):
        emulated = subprocess.run([sys.executable, "-m", "lab.kernel.emulate", *source, "--",
                                   sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                                  cwd=PROJECT)
        assert emulated.returncode == 0, emulated.stderr
        seen.append(ast.literal_eval(emulated.stdout))
    assert seen[0] == seen[1]
    linux, asterinas = ast.literal_eval(native.stdout), seen[1]
    assert linux["renameat2_exchange"] == 0 and asterinas["renameat2_exchange"] == errno.EINVAL
    assert linux["copy_file_range"] == errno.EBADF and asterinas["copy_file_range"] == errno.ENOSYS
    assert linux["unshare_newpid"] == 0 and asterinas["unshare_newpid"] == errno.EINVAL
    assert asterinas["renameat2_plain"] == 0 and asterinas["unshare_newns"] == 0  # what Asterinas has still works


def test_emulation_plan_names_what_seccomp_cannot_express():
    from lab.kernel.emulate import plan
    p = plan(load_profile("asterinas-0.18.1", shared_data=shared_file("data")), "ext2")
    assert "copy_file_range" in p.enosys and "open_tree" in p.enosys and "renameat2" not in p.enosys
    assert ("renameat2:RENAME_EXCHANGE", "EINVAL") in {(k, e) for k, _, e in p.flags}
    assert "clone3" in p.enosys  # so that glibc falls back to clone, whose flags seccomp can read
    assert p.no_writeback and p.hide_sysfs_block
    assert any(line.startswith("mount:vfat: ENODEV") for line in p.not_emulated)
    on_tmpfs = plan(load_profile("asterinas-0.18.1", shared_data=shared_file("data")), "tmpfs")
    assert "renameat2:RENAME_EXCHANGE" not in {k for k, _, _ in on_tmpfs.flags}


def _requirements() -> Trace:
    if not REQUIREMENTS.is_file():
        pytest.fail(f"{REQUIREMENTS} is missing: regenerate it with `stonelab kernel trace`")
    return Trace.from_json(REQUIREMENTS.read_text(), str(REQUIREMENTS))


def test_requirements_cover_every_operation_and_flag():
    trace = _requirements()
    assert trace.traced_on  # where it was traced ("Linux guest …", or "this machine's kernel (--host)")
    for phase in ("exchange:install", "exchange:upgrade-trigger", "exchange:remove", "exchange:sync",
                  "exchange:activate", "exchange:prune", "exchange:verify", "exchange:verify-repair",
                  "exchange:boot-sync", "symlink:install", "blit:copy", "recover:swap.before", "recover:boot.mid"):
        assert phase in trace.phases, phase
    keys = {f.key for f in trace.features}
    if "Linux guest" in trace.traced_on:  # root= derived from mountinfo and sysfs, as on a real system
        assert "sysfs:block" in {f.key for f in trace.features}
    for key in ("renameat2:RENAME_EXCHANGE", "openat:O_TMPFILE", "syncfs", "fsync", "fdatasync",
                "unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS", "pivot_root",
                "prctl:PR_SET_PDEATHSIG", "flock:LOCK_EX|LOCK_NB", "mount:MS_BIND"):
        assert key in keys, key
    assert trace.to_json() == REQUIREMENTS.read_text()  # canonical form: regenerating writes the same bytes
    text = REQUIREMENTS.read_text()
    assert "/tmp/" not in text and "/mnt/" not in text and '"calls"' not in text


def test_asterinas_report_names_every_blocker_with_evidence(tmp_path: Path):
    shared_file("data")
    result = _cli("compat", "report", "--profile", "asterinas-0.18.1", "--profile",
                  next((PROJECT / "compat" / "profiles").glob("linux-*.json")).stem, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "compat-report.json").read_text())
    asterinas, linux = data["sections"]
    blockers = {g["feature"]: g for g in asterinas["blockers"]}
    expected = {"renameat2:RENAME_EXCHANGE": ("EINVAL", "not supported on ext2"),
                "mount:vfat": ("ENODEV", "vfat"),
                "unshare:CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS": ("EINVAL", "CLONE_NEWPID"),
                "unshare:CLONE_NEWUSER": ("EINVAL", "CLONE_NEWUSER"),
                "durability": ("wrong-semantics", "#3828"), "writeback": ("wrong-semantics", "writeback"),
                "reboot:sync": ("wrong-semantics", "does not sync")}
    for key, (status, evidence) in expected.items():
        assert key in blockers, key
        assert blockers[key]["result"] == status and evidence in blockers[key]["evidence"], blockers[key]
        assert blockers[key]["source"], key
    assert "no journal" in blockers["durability"]["evidence"]
    assert linux["blockers"] == [] and linux["evidence"] == "probed"
    markdown = (tmp_path / "compat-report.md").read_text()
    html = (tmp_path / "compat-report.html").read_text()
    for key in expected:
        assert f"**{key}**" in markdown and key in html
    assert "| operation | asterinas-0.18.1 |" in markdown and "<table>" in html
    assert any(row["operation"] == "exchange:install" and row["cells"][0].startswith("blocker")
               for row in data["matrix"])


def test_a_workaround_is_verified_only_by_scenarios_that_passed(tmp_path: Path):
    from lab.kernel.report import build
    record = {"profile": "asterinas-0.18.1", "model": "power cut",
              "scenarios": [{"name": "install-upgrade-rollback", "verdict": "pass", "reason": ""},
                            {"name": "reference-survives-power-cut", "verdict": "fail", "reason": "lost"}]}
    (tmp_path / "asterinas-0.18.1.json").write_text(json.dumps(record))
    profile = load_profile("asterinas-0.18.1", shared_data=shared_file("data"))
    data = build(_requirements(), "requirements.json", [(profile, "ext2")], verified_dir=tmp_path)
    gaps = {g["feature"]: g for g in data["sections"][0]["gaps"]}
    assert gaps["renameat2:RENAME_EXCHANGE"]["verified"].startswith("verified: install-upgrade-rollback")
    assert gaps["writeback"]["verified"].startswith("not verified (reference-survives-power-cut: fail — lost")


def test_the_probe_initramfs_follows_a_user_initrd(tmp_path: Path):
    from lab.kernel.boot import _initramfs
    user = tmp_path / "user.cpio"
    user.write_bytes(b"070701" + b"0" * 101)  # the archive a kernel's own initrd would be (length not a multiple of 4)
    probe = tmp_path / "probe"
    probe.write_bytes(b"\x7fELF probe")
    out = _initramfs(tmp_path / "out.cpio", probe, [("ext2", tmp_path / "ext2.img")], None, user, first_disk=1)
    data = out.read_bytes()
    assert data.startswith(user.read_bytes()) and data[108:114] == b"070701"  # padded to 4 bytes, then ours
    assert b"/bin/probe ext2 /mnt/ext2 /dev/vdb ext2" in data and b"\x7fELF probe" in data


def test_a_traced_workload_is_reproducible_byte_for_byte(tmp_path: Path):
    import shutil
    from lab.kernel.trace import run_workload
    from vm.disk import DiskLayout, build_disk
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (Debian package strace)")
    outputs = []
    # different work directories, as TMPDIR would give; one phase group at a time, then both groups at once
    for run, jobs in (("first-place", 1), ("another/deeper/place", 2)):
        work = tmp_path / run
        work.mkdir(parents=True)
        disk = build_disk(work / "esp.img", DiskLayout(esp_mib=40, root_mib=8))
        trace = run_workload(work, f"{disk.path}:1", root_device=f"{disk.path}:2", traced_on="host", jobs=jobs,
                             only=("exchange:install", "crash:swap.after", "recover:swap.after"))
        outputs.append(trace.to_json())
    assert outputs[0] == outputs[1]
    assert "renameat2:RENAME_EXCHANGE" in outputs[0] and str(tmp_path) not in outputs[0]


def test_phase_groups_share_nothing_but_run_in_order(tmp_path: Path):
    from lab.kernel.trace import groups_of, workload
    phases = workload(tmp_path, "/esp")
    groups = groups_of(phases)
    assert sum(map(len, groups)) == len(phases) == 36 and len(groups) > 10
    owner: dict[str, int] = {}
    for number, group in enumerate(groups):
        for root in {a for p in group for a in p.argv if a.startswith(str(tmp_path / "root-"))}:
            assert owner.setdefault(root, number) == number, root  # a root belongs to one group
        assert group == sorted(group, key=phases.index)  # in workload order within the group
    esp_users = [g for g in groups if any("/esp" in p.argv for p in g)]
    assert len(esp_users) == 1 and {"exchange:boot-sync", "crash:boot.mid"} <= {p.name for p in esp_users[0]}
    assert groups[0] == esp_users[0]  # the longest group starts first


def test_merged_requirements_say_which_system_a_gap_hits():
    from lab.kernel.report import build
    reference = Trace([Feature("renameat2:RENAME_EXCHANGE", "renameat2", "RENAME_EXCHANGE", "transaction",
                               ["exchange:install"])], ["exchange:install"], "guest")
    systems = Trace([Feature("renameat2:RENAME_EXCHANGE", "renameat2", "RENAME_EXCHANGE", "transaction",
                             ["ostree:upgrade"], ["EINVAL"]),
                     Feature("fsync", "fsync", "", "transaction", ["nix:install", "ostree:install"])],
                    ["nix:install", "ostree:install", "ostree:upgrade"], "guest, systems")
    merged = reference.merged(systems)
    assert merged.phases == ["exchange:install", "nix:install", "ostree:install", "ostree:upgrade"]
    assert merged.feature("renameat2:RENAME_EXCHANGE").phases == ["exchange:install", "ostree:upgrade"]
    assert merged.feature("renameat2:RENAME_EXCHANGE").errors == ["EINVAL"]
    profile = load_profile("asterinas-0.18.1", shared_data=shared_file("data"))
    data = build(merged, "r.json", [(profile, "ext2")])
    section = data["sections"][0]
    gaps = {g["feature"]: g for g in section["gaps"]}
    assert gaps["renameat2:RENAME_EXCHANGE"]["systems"] == ["reference", "OSTree"]
    assert gaps["fsync"]["systems"] == ["Nix", "OSTree"]
    assert "fsync" in section["systems_hit"]["Nix"] and "renameat2:RENAME_EXCHANGE" not in section["systems_hit"]["Nix"]


def test_committed_systems_requirements_reach_the_report(tmp_path: Path):
    systems = PROJECT / "compat" / "requirements-systems.json"
    if not systems.is_file():
        pytest.fail(f"{systems} is missing: regenerate it with `stonelab kernel trace --systems`")
    trace = Trace.from_json(systems.read_text(), str(systems))
    assert trace.to_json() == systems.read_text() and "Linux guest" in trace.traced_on
    for phase in ("nix:install", "nix:upgrade", "nix:rollback", "nix:switch", "nix:gc", "ostree:install",
                  "ostree:upgrade", "ostree:rollback", "ostree:gc"):
        assert phase in trace.phases, phase
    keys = {f.key for f in trace.features}
    assert {"fsync", "rename"} & keys and any(k.startswith("openat:") for k in keys)
    shared_file("data")
    result = _cli("compat", "report", "--profile", "asterinas-0.18.1", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "compat-report.json").read_text())
    assert "requirements-systems.json" in data["requirements_source"]
    rows = {row["operation"] for row in data["matrix"]}
    assert {"nix:install", "ostree:upgrade", "exchange:install"} <= rows
    hit = data["sections"][0]["systems_hit"]
    assert hit["Nix"] and hit["OSTree"], hit
    markdown = (tmp_path / "compat-report.md").read_text()
    assert "Gaps that hit Nix:" in markdown and "Gaps that hit OSTree:" in markdown


def test_a_command_the_lab_killed_says_it_timed_out():
    from lab.target import CommandResult
    killed = CommandResult(["stonelab", "install"], -9, "", "extracting\n", 300.2, timed_out=True)
    assert killed.summary() == "timed out: killed after 300 s (last output: extracting)" and not killed.ok
    assert CommandResult(["x"], -9, "", "", 1.0).summary() == "exit -9"


def test_multiboot_modules_go_to_qemu_in_order(tmp_path: Path):
    from vm.accel import AccelChoice
    from vm.machine import foreign_config
    from vm.qemu import qemu_args
    config = foreign_config(tmp_path / "xen", AccelChoice("tcg", "test"), "console=com1 com1=115200,8n1",
                            modules=("/boot/vmlinuz-x console=hvc0", "/tmp/probe.cpio"))
    args = qemu_args(config, tmp_path)
    assert args[args.index("-initrd") + 1] == "/boot/vmlinuz-x console=hvc0,/tmp/probe.cpio"
    assert args[args.index("-append") + 1] == "console=com1 com1=115200,8n1"
    comma = foreign_config(tmp_path / "xen", AccelChoice("tcg", "test"), modules=("/m a=1,2",))
    assert qemu_args(comma, tmp_path)[qemu_args(comma, tmp_path).index("-initrd") + 1] == "/m a=1,,2"


def test_a_gzip_compressed_multiboot_kernel_is_decompressed_and_checked(tmp_path: Path):
    import gzip
    from lab.kernel.boot import _plain_image, check_image
    from stonelab.errors import StonelabError
    elf = b"\x7fELF" + b"\0" * 60 + (0x1BADB002).to_bytes(4, "little") + b"\0" * 100
    packed = tmp_path / "xen-test.gz"
    packed.write_bytes(gzip.compress(elf))
    plain = _plain_image(packed, "multiboot", tmp_path / "work" if (tmp_path / "work").mkdir() is None else None)
    assert plain.name == "xen-test" and plain.read_bytes() == elf
    check_image(plain, "multiboot")
    assert _plain_image(packed, "linux", tmp_path) == packed  # only multiboot kernels are unpacked
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(elf)[:20])
    with pytest.raises(StonelabError, match="broken.gz: cannot decompress"):
        _plain_image(broken, "multiboot", tmp_path / "work")


def test_a_damaged_root_is_a_finding_not_a_lab_error(monkeypatch, capsys):
    import errno
    import lab.probe
    from lab.probe import DAMAGED_EXIT, main

    def damaged(root, **_):
        raise OSError(errno.EUCLEAN, "Structure needs cleaning", str(root / "usr"))
    monkeypatch.setattr(lab.probe, "observe", damaged)
    assert main(["/mnt/sut"]) == DAMAGED_EXIT
    assert "STONELAB-ROOT-DAMAGED /mnt/sut/usr: Structure needs cleaning (errno EUCLEAN)" in capsys.readouterr().err

    def broken_lab(root, **_):
        raise OSError(errno.EACCES, "Permission denied", str(root))
    monkeypatch.setattr(lab.probe, "observe", broken_lab)
    with pytest.raises(PermissionError):  # anything else is still the lab's own failure
        main(["/mnt/sut"])


def test_a_step_failure_outside_a_step_is_a_fail_verdict(monkeypatch, tmp_path: Path):
    import lab.runner
    from lab.scenario import load_scenario
    from lab.steps import StepFailure

    def unreadable(*_args, **_kwargs):
        raise StepFailure("the root filesystem (ext2) is damaged: STONELAB-ROOT-DAMAGED /mnt/sut/usr")
    monkeypatch.setattr(lab.runner, "_run_steps", unreadable)
    result = lab.runner.run_scenario(load_scenario(PROJECT / "scenarios" / "reference-survives-power-cut.yaml"),
                                     workdir=tmp_path)
    assert (result.verdict, result.reason) == ("fail", "the root filesystem (ext2) is damaged: "
                                                       "STONELAB-ROOT-DAMAGED /mnt/sut/usr")


def test_compat_verify_records_the_verdicts_of_the_run(monkeypatch, tmp_path: Path):
    import argparse
    import lab.kernel.report as report
    shared_file("data")

    def fake_run(argv, **_kwargs):  # what `stonelab run --report-dir DIR` leaves: DIR/<timestamp>/, DIR/latest
        out = Path(argv[argv.index("--report-dir") + 1]) / "latest"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"cases": [
            {"name": "install-upgrade-rollback", "verdict": "pass", "reason": "all invariants held"},
            {"name": "reference-survives-power-cut", "verdict": "fail", "reason": "the root filesystem (ext2) is "
                                                                                   "damaged"}]}))
        return subprocess.CompletedProcess(argv, 1, "", "")
    monkeypatch.setattr(report.subprocess, "run", fake_run)
    monkeypatch.setattr(report, "VERIFIED_DIR", tmp_path)
    assert report.cmd_verify(argparse.Namespace(profile="asterinas-0.18.1", scenarios=[])) == 0
    record = json.loads((tmp_path / "asterinas-0.18.1.json").read_text())
    assert [(s["name"], s["verdict"]) for s in record["scenarios"]] == [("install-upgrade-rollback", "pass"),
                                                                         ("reference-survives-power-cut", "fail")]
    verification = report.load_verification("asterinas-0.18.1", tmp_path)
    assert verification.verified("syncfs") == [] and verification.verified("swap-symlink") == ["install-upgrade-rollback"]
