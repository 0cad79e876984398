"""What the reference implementation asks of a kernel — traced in the Linux guest, not guessed.

Every operation of the reference (install, upgrade with a transaction trigger, remove, sync from a repository,
activate, prune, verify and ``verify --repair``, boot sync to a mounted vfat ESP with ``root=`` derived from
sysfs, recovery after each fault point, both swap strategies, each blit strategy) runs under ``strace -f`` and
every call is reduced to a *feature*: the syscall plus the flags that decide whether a kernel supports it
(``renameat2:RENAME_EXCHANGE``, ``openat:O_CREAT|O_EXCL|O_NOFOLLOW``, ``unshare:CLONE_NEWNS|CLONE_NEWPID``,
``mount:tmpfs:MS_NODEV|MS_NOSUID``, ``prctl:PR_SET_PDEATHSIG``, ``ioctl:FICLONE``), plus the needs that are paths
rather than calls (``sysfs:block`` when ``/sys/dev/block`` or ``/sys/class/block`` is read).

The result, ``compat/requirements.json``, holds only what does not depend on the machine: feature keys, flags,
the phases that used each and the errno names seen (no counts, paths, users, TMPDIR or kernel release), sorted —
so regenerating it reproduces it byte for byte.  ``stonelab kernel trace`` restores the default guest saved
after boot (``trace_in_guest``: ``vm.snapshot``, the EROFS userland) and runs ``python -m lab.kernel.trace --run``
there; ``--host`` traces on this machine's kernel instead (quick, not the reference answer).

Speed under TCG: strace stops the tracee only for the traced calls (``--seccomp-bpf`` with ``--trace=`` the calls
recorded here), and the workload's independent phase groups — each installation root is one group, and every phase
that writes the ESP is in the ``exchange`` group — run ``--jobs`` at a time on the guest's vCPUs.  The logs are
parsed in workload order afterwards, so the result does not depend on the schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference_impl.stone import PackageSpec, build_package_from_files
from reference_impl.stone.repository import write_repository_index
from stonelab.errors import StonelabError

FORMAT = 2
REQUIREMENTS = Path(__file__).resolve().parents[2] / "compat" / "requirements.json"
SYSTEMS_REQUIREMENTS = REQUIREMENTS.with_name("requirements-systems.json")  # Nix and OSTree (trace_systems)
# Calls whose outcome decides whether a transaction, the store or a boot sync can work; the rest is what the
# interpreter needs to run at all ("runtime").
TRANSACTION_CALLS = {
    "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat", "unlink",
    "unlinkat", "rmdir", "open", "openat", "openat2", "creat", "fsync", "fdatasync", "syncfs", "sync", "flock",
    "fcntl", "ioctl", "copy_file_range", "sendfile", "fchmod", "fchmodat", "fchown", "fchownat", "chmod", "chown",
    "lchown", "utimensat", "mount", "umount2", "unshare", "clone", "clone3", "setns", "chroot", "pivot_root",
    "prctl", "prlimit64", "setrlimit", "readlink", "readlinkat", "getdents64", "statx", "newfstatat", "fstat",
    "lstat", "stat", "statfs", "fstatfs", "pread64", "pwrite64", "ftruncate", "fallocate", "faccessat",
    "faccessat2", "access", "setxattr", "fsetxattr", "lsetxattr", "getxattr", "fgetxattr", "lgetxattr",
    "open_tree", "move_mount", "mount_setattr", "fsopen", "fsmount", "sync_file_range", "mknodat", "mknod",
    # what Nix and OSTree also call (lab/kernel/trace_systems.py)
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "utimes", "futimesat",
}
# Runtime calls a foreign kernel may lack (Asterinas: rseq) — traced too, so their ENOSYS is judged.
RUNTIME_CALLS_OF_INTEREST = {"rseq", "clone", "clone3", "execve", "set_robust_list", "getrandom", "membarrier",
                             "close_range", "pidfd_open", "statfs", "sched_getaffinity", "memfd_create", "epoll_create1"}
TERMINAL_IOCTLS = {"TCGETS", "TIOCGWINSZ", "TCSETS", "FIONBIO", "FIOCLEX", "TIOCGPGRP", "TIOCSPGRP"}
OPEN_FLAGS = ("O_CREAT", "O_EXCL", "O_TMPFILE", "O_SYNC", "O_DSYNC", "O_NOFOLLOW", "O_DIRECTORY", "O_PATH",
              "O_TRUNC")
TRACED_CALLS = ",".join(sorted(TRANSACTION_CALLS | RUNTIME_CALLS_OF_INTEREST))
SYSFS_BLOCK = re.compile(r'"/sys/(dev/block|class/block|block)[/"]')
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?:<\.\.\. (?P<resumed>\w+) resumed>(?P<rest>.*)|(?P<name>\w+)\((?P<args>.*))$")
_RESULT = re.compile(r"\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)(?:\s+(?P<errno>E[A-Z0-9]+))?")


@dataclass
class Feature:
    """One requirement: ``key`` (``syscall[:detail]``), the phases that used it, the errno names it met."""

    key: str
    syscall: str
    detail: str
    category: str  # transaction | runtime
    phases: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    calls: int = 0  # this run only; not written to requirements.json (it varies with timing)


@dataclass
class Trace:
    """The requirements: features sorted by (category, key); ``phases`` in the order they ran."""

    features: list[Feature]
    phases: list[str]
    traced_on: str

    def to_json(self) -> str:
        """The byte-stable form committed as ``compat/requirements.json``."""
        features = [{k: v for k, v in asdict(f).items() if k != "calls"} for f in self.features]
        return json.dumps({"format": FORMAT, "traced_on": self.traced_on, "phases": self.phases,
                           "features": features}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "trace") -> Trace:
        try:
            data = json.loads(text)
            return cls([Feature(**f) for f in data["features"]], data["phases"], data["traced_on"])
        except (ValueError, KeyError, TypeError) as err:
            raise StonelabError(f"{where}: not a stonelab requirements file ({err})") from None

    def feature(self, key: str) -> Feature | None:
        return next((f for f in self.features if f.key == key), None)

    @classmethod
    def collect(cls, features: dict[str, Feature], phases: list[str], traced_on: str) -> Trace:
        """The canonical trace of what :func:`parse_strace` gathered: errno names sorted, features by
        (category, key)."""
        for feature in features.values():
            feature.errors.sort()
        return cls(sorted(features.values(), key=lambda f: (f.category != "transaction", f.key)), phases, traced_on)

    def merged(self, other: Trace) -> Trace:
        """Both traces' requirements in one (phases of both; a feature's phases and errno names united), for
        judging a kernel against the reference and the real systems at once."""
        features: dict[str, Feature] = {}
        for feature in (*self.features, *other.features):
            into = features.setdefault(feature.key, Feature(feature.key, feature.syscall, feature.detail,
                                                            feature.category))
            into.phases += [p for p in feature.phases if p not in into.phases]
            into.errors += [e for e in feature.errors if e not in into.errors]
        return Trace.collect(features, [*self.phases, *other.phases], f"{self.traced_on}; {other.traced_on}")


def _split_args(args: str) -> list[str]:
    """Top-level comma split of an strace argument list (strings and braces kept whole)."""
    parts, depth, current, quoted = [], 0, [], False
    i = 0
    while i < len(args):
        ch = args[i]
        if quoted:
            current.append(ch)
            if ch == "\\" and i + 1 < len(args):
                current.append(args[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch in "[{(":
            depth += 1
            current.append(ch)
        elif ch in "]})":
            if depth == 0:
                break
            depth -= 1
            current.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    if current:
        parts.append("".join(current).strip())
    return parts


def _flags(text: str, prefix: str = "") -> str:
    """``A|B|0x10`` → sorted symbolic flags joined by ``|`` (numbers and ``0`` dropped)."""
    return "|".join(sorted({f for f in re.split(r"[|\s]+", text) if f.startswith(prefix) and f[:1].isalpha()}))


def feature_detail(name: str, args: list[str]) -> str:
    """The part of a call that decides support (see the module docstring)."""
    def arg(i: int) -> str:
        return args[i] if len(args) > i else ""
    if name in ("renameat2", "linkat"):
        return _flags(arg(4))
    if name in ("openat", "open", "openat2"):
        flags = arg(2 if name != "open" else 1)
        return "|".join(f for f in sorted(OPEN_FLAGS) if re.search(rf"\b{f}\b", flags))
    if name == "unshare":
        return _flags(arg(0), "CLONE_NEW")
    if name in ("clone", "clone3"):
        return _flags(" ".join(args).replace("flags=", " ").replace(",", " "), "CLONE_NEW")
    if name == "mount":
        fstype = arg(2).strip('"')
        flags = _flags(arg(3), "MS_")
        return ":".join(p for p in (fstype if fstype not in ("NULL", "") else "", flags) if p)
    if name == "ioctl":
        request = arg(1)
        return "FICLONE" if "FICLONE" in request else request.split(" ")[0]
    if name in ("flock", "fcntl", "umount2", "prctl"):
        return _flags(arg(1) if name != "prctl" else arg(0)) or ""
    if name in ("prlimit64", "setrlimit"):
        return arg(1) if name == "prlimit64" else arg(0)
    if name in ("mount_setattr", "open_tree"):
        return _flags(arg(2))
    return ""


def parse_strace(text: str, phase: str, into: dict[str, Feature]) -> None:
    """Add every call of an ``strace -f`` log (``<unfinished>``/``resumed`` joined) to ``into`` under ``phase``."""
    pending: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid = match["pid"]
        if match["resumed"]:
            name, head = pending.pop(pid, (match["resumed"], ""))
            body = head + match["rest"]
        else:
            name, body = match["name"], match["args"]
            if body.endswith("<unfinished ...>"):
                pending[pid] = (name, body[: -len("<unfinished ...>")])
                continue
        result = _RESULT.search(body)
        detail = feature_detail(name, _split_args(body))
        keys = [f"{name}:{detail}" if detail else name]
        if SYSFS_BLOCK.search(body):
            keys.append("sysfs:block")
        for key in keys:
            syscall = key.split(":", 1)[0]
            feature = into.get(key)
            if feature is None:
                transaction = (syscall in TRANSACTION_CALLS and detail not in TERMINAL_IOCTLS) or key == "sysfs:block"
                feature = into[key] = Feature(key, syscall, "" if key == "sysfs:block" else detail,
                                              "transaction" if transaction else "runtime")
            feature.calls += 1
            if phase not in feature.phases:
                feature.phases.append(phase)
            if result and result["errno"] and result["errno"] not in feature.errors and key != "sysfs:block":
                feature.errors.append(result["errno"])


@dataclass(frozen=True)
class Phase:
    """One traced command: ``argv`` of ``stonelab``, an optional untraced ``before`` (argv of ``python -m``)
    and extra environment (fault points).  Phases of one ``group`` share a root (or the ESP) and run in order;
    groups are independent of each other and may run at the same time."""

    name: str
    argv: list[str]
    before: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    expect_failure: bool | None = False  # None: either (the exit status is not what is traced)
    group: str = ""


BUSYBOX = Path("/bin/busybox")
KERNEL_VERSION = "6.1.0-lab"
TRIGGER = """\
name: trace-trigger
description: a transaction trigger, so the sandbox's namespace and mount calls are traced
handlers:
    noop:
        run: /usr/bin/busybox
        args: ["true"]
paths:
    "/usr/share/tool/*":
        handlers: [noop]
"""
FAULT_POINTS = ("blit.mid", "state.recorded", "swap.before", "swap.after", "archive.after", "boot.before",
                "boot.mid", "commit.after")


def _package(out: Path, name: str, version: str, files: dict[str, str | bytes],
             executable: tuple[str, ...] = ()) -> Path:
    spec = PackageSpec(name=name, version=version, release=int(version), summary="trace workload",
                       license=["MPL-2.0"], modes={rel: 0o755 for rel in executable if rel in files})
    return build_package_from_files(files, spec, out / f"{name}-{version}.stone",
                                    symlinks={f"bin/{name}-link": Path(next(iter(files))).name}, level=3)


def packages(out: Path) -> dict[str, Path]:
    """The workload's packages: tool 1 (an empty file, a kernel for boot sync), tool 2 (a trigger and busybox when
    running as root), tool 3 (for the repository sync) and an extra package to remove."""
    kernel = {f"lib/kernel/{KERNEL_VERSION}/vmlinuz": b"not a real kernel\n" * 64,
              "lib/os-release": 'ID=aerynos\nNAME="AerynOS"\n'}
    v1 = _package(out, "tool", "1", {"bin/tool": "one", "share/tool/empty": "", "share/tool/a": "a", **kernel},
                  ("bin/tool",))
    v2_files: dict[str, str | bytes] = {"bin/tool": "two", "share/tool/b": "b", "lib/libtool.so.2": "elf", **kernel}
    if BUSYBOX.is_file() and os.geteuid() == 0:  # the trigger sandbox needs root (mount namespaces)
        v2_files |= {"bin/busybox": BUSYBOX.read_bytes(), "share/moss/triggers/tx.d/trace.yaml": TRIGGER}
    v2 = _package(out, "tool", "2", v2_files, ("bin/tool", "bin/busybox"))
    repo = out / "repo"
    repo.mkdir(exist_ok=True)
    v3 = _package(repo, "tool", "3", {"bin/tool": "three", **kernel}, ("bin/tool",))
    write_repository_index(repo)  # once, before any group syncs from it
    extra = _package(out, "extra", "1", {"share/extra/data": "extra"})
    return {"v1": v1, "v2": v2, "v3": v3, "extra": extra, "repo": repo}


def workload(workdir: Path, esp: str, root_device: str | None = None) -> list[Phase]:
    """The phases traced, in order: per swap strategy the whole life of an installation, then each blit
    strategy, then a crash at each fault point and the recovery the next verb runs.  Boot sync writes ``esp``;
    ``root=`` comes from ``root_device``, or (None) from /proc/self/mountinfo and sysfs as on a real system.
    Every phase that writes the ESP is in the ``exchange`` group, so the ESP sees the same sequence whatever
    runs in parallel."""
    pkgs = packages(workdir / "packages")
    parent = workdir
    esp_args = ["--esp", esp, *(["--root-device", root_device] if root_device else [])]
    phases: list[Phase] = []
    for strategy in ("exchange", "symlink"):
        root = parent / f"root-{strategy}"
        root.mkdir()
        common = ["-D", str(root), "--swap", strategy]
        boot = esp_args if strategy == "exchange" else []
        group = [
            Phase(f"{strategy}:install", ["install", *common, *boot, str(pkgs["v1"]), str(pkgs["extra"])]),
            Phase(f"{strategy}:upgrade-trigger", ["install", *common, *boot, str(pkgs["v2"])]),
            Phase(f"{strategy}:remove", ["remove", *common, *boot, "extra"]),
            Phase(f"{strategy}:verify", ["state", "verify", *common]),
            Phase(f"{strategy}:verify-repair", ["state", "verify", *common, "--repair"],
                  before=["lab.faults", "corrupt-asset", str(root)], expect_failure=None),
            Phase(f"{strategy}:sync", ["sync", *common, *boot, "--repo", str(pkgs["repo"] / "stone.index")]),
            Phase(f"{strategy}:activate", ["state", "activate", *common, *boot, "1"]),
            Phase(f"{strategy}:prune", ["state", "prune", *common, "--keep", "2"]),
        ]
        if strategy == "exchange":
            group.append(Phase("exchange:boot-sync", ["boot", "sync", "-D", str(root), *esp_args]))
        phases += [dataclasses.replace(p, group=strategy) for p in group]
    for blit in ("hardlink", "reflink", "copy"):
        root = parent / f"root-blit-{blit}"
        root.mkdir()
        phases.append(Phase(f"blit:{blit}", ["install", "-D", str(root), "--blit", blit, str(pkgs["v1"])],
                            expect_failure=blit == "reflink", group=f"blit:{blit}"))
    for point in FAULT_POINTS:
        root = parent / f"root-fault-{point}"
        root.mkdir()
        boot = esp_args if point.startswith("boot") else []
        group = "exchange" if boot else f"fault:{point}"
        phases.append(Phase(f"crash:{point}", ["install", "-D", str(root), *boot, str(pkgs["v1"])],
                            env={"STONELAB_FAULT": f"{point}:crash"}, expect_failure=True, group=group))
        phases.append(Phase(f"recover:{point}", ["state", "list", "-D", str(root)], group=group))
    return phases


def groups_of(phases: list[Phase]) -> list[list[Phase]]:
    """The phases by group (each in workload order), the longest group first (it bounds the run's length)."""
    by_group: dict[str, list[Phase]] = {}
    for phase in phases:
        by_group.setdefault(phase.group or phase.name, []).append(phase)
    return sorted(by_group.values(), key=len, reverse=True)


def run_workload(workdir: Path, esp: str, *, root_device: str | None = None, strace: str | None = None,
                 only: tuple[str, ...] = (), traced_on: str = "", jobs: int = 1,
                 timings: dict[str, float] | None = None) -> Trace:
    """Run (a prefix-filtered part of) the workload under strace here, ``jobs`` groups at a time (each group's
    phases in order); the logs are read in workload order, so the result does not depend on ``jobs``.
    ``timings`` (when given) receives each phase's wall-clock seconds.  Raises StonelabError naming the first
    phase (in workload order) that failed unexpectedly."""
    strace = strace or shutil.which("strace")
    if not strace:
        raise StonelabError("strace is not installed (Debian package strace)")
    phases = [p for p in workload(workdir, esp, root_device) if not only or p.name.startswith(only)]
    env = {k: v for k, v in os.environ.items() if k != "STONELAB_FAULT"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    logs = {p.name: workdir / f"{p.name.replace(':', '-')}.strace" for p in phases}
    failures: dict[str, str] = {}
    stop = threading.Event()

    def run_group(group: list[Phase]) -> None:
        for phase in group:
            if stop.is_set():
                return
            started = time.monotonic()
            failure = _run_phase(phase, strace, logs[phase.name], env)
            if timings is not None:
                timings[phase.name] = time.monotonic() - started
            if failure:
                failures[phase.name] = failure
                stop.set()
                return

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run_group, group) for group in groups_of(phases)]:
            future.result()
    if failures:
        first = next(p.name for p in phases if p.name in failures)
        raise StonelabError(f"traced phase {first} {failures[first]}")
    features: dict[str, Feature] = {}
    for phase in phases:
        parse_strace(logs[phase.name].read_text(errors="replace"), phase.name, features)
        logs[phase.name].unlink()
    return Trace.collect(features, [p.name for p in phases], traced_on)


def _run_phase(phase: Phase, strace: str, log: Path, env: dict[str, str]) -> str:
    """Run one phase under strace into ``log``; "" when its exit status is the expected one, else why not."""
    if phase.before:
        subprocess.run([sys.executable, "-m", *phase.before], capture_output=True, env=env, check=True)
    # only the calls that decide support stop the process (--seccomp-bpf): under TCG a full trace is ~10x slower
    argv = [strace, "-f", "-qq", "-s", "256", "--seccomp-bpf", f"--trace={TRACED_CALLS}", "-o", str(log),
            sys.executable, "-m", "stonelab.cli", *phase.argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env | phase.env, timeout=900)
    if phase.expect_failure is not None and (proc.returncode != 0) != phase.expect_failure:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"exited {proc.returncode}: {tail}"
    return ""


def load_requirements(paths: list[Path]) -> Trace:
    """The requirements files ``paths`` as one trace (see :meth:`Trace.merged`); StonelabError (one line) for an
    unreadable or malformed file."""
    merged: Trace | None = None
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise StonelabError(f"{path}: cannot read the requirements ({err.strerror})") from None
        except UnicodeDecodeError:
            raise StonelabError(f"{path}: not a stonelab requirements file (not UTF-8 text)") from None
        trace = Trace.from_json(text, str(path))
        merged = trace if merged is None else merged.merged(trace)
    if merged is None:
        raise StonelabError("no requirements file given")
    return merged


def default_requirements() -> list[Path]:
    """``compat/requirements.json`` and, when it exists, the real systems' ``compat/requirements-systems.json``."""
    return [REQUIREMENTS, *([SYSTEMS_REQUIREMENTS] if SYSTEMS_REQUIREMENTS.is_file() else [])]


GUEST_SUT = "/mnt/sut"
GUEST_ESP = "/mnt/esp"


def trace_in_guest(kernel_path: str | None = None, accel: str = "auto", workdir: Path | None = None,
                   only: tuple[str, ...] = (), *, jobs: int = 2, snapshots: bool = True,
                   repeat: int = 1) -> tuple[list[Trace], dict[str, float]]:
    """Restore the default Linux guest saved after boot (``vm.snapshot``; ``snapshots=False`` boots it) with
    ``jobs`` vCPUs and a GPT disk (vfat ESP, ext4 root), mount both and run the workload there ``repeat`` times,
    each in a work directory of its own (``python -m lab.kernel.trace --run``, ``jobs`` groups at a time).
    Returns the traces and the phases' seconds (of the last run).  The guest is gone when this returns; raises
    StonelabError when the workload fails in it."""
    from vm.accel import AccelSelector
    from vm.disk import DiskLayout, build_disk
    from vm.host import default_kernel, kernel_from_path
    from vm.machine import PROJECT_DIR, Machine, agent_config
    from vm.qemu import DiskSpec
    from vm.snapshot import resume, saved_state

    kernel = kernel_from_path(Path(kernel_path)) if kernel_path else default_kernel()
    choice = AccelSelector().choose(kernel, accel)
    traces: list[Trace] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="stonelab-trace-", dir=workdir) as tmp:
        disk = build_disk(Path(tmp) / "trace.img", DiskLayout(esp_mib=48, root_mib=256))
        config = agent_config(kernel, choice, [DiskSpec(disk.path)], memory_mb=1536, cpus=max(1, jobs))
        restore = saved_state(config) if snapshots else None
        with Machine(config, name="trace", console_log=Path(tmp) / "console.log", restore_from=restore) as guest:
            if restore is not None:
                resume(guest)
            guest.succeed(f"mkdir -p {GUEST_SUT} {GUEST_ESP} && mount -t ext4 /dev/vda2 {GUEST_SUT} && "
                          f"mount -t vfat /dev/vda1 {GUEST_ESP}")
            for run in range(repeat):
                # each run's work directory has another name and depth, as another TMPDIR would give
                work = f"{GUEST_SUT}/work{run}" + "/deeper" * run
                result = guest.execute([sys.executable, "-m", "lab.kernel.trace", "--run", work, "--esp", GUEST_ESP,
                                        "--jobs", str(jobs), "--timings", "/tmp/timings.json",
                                        *(word for o in only for word in ("--only", o))],
                                       timeout=3600, cwd=str(PROJECT_DIR))
                if result.exit_code != 0:
                    raise StonelabError(f"the traced workload failed in the guest: {result.stderr.strip()[-400:]}")
                traces.append(Trace.from_json(result.stdout, "guest trace output"))
                timings = json.loads(guest.read_file("/tmp/timings.json"))
            guest.shutdown()
    return traces, timings


GUEST_TRACED_ON = "Linux guest (QEMU), root ext4 + vfat ESP"


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.kernel.trace --run DIR --esp ESP`` (in a guest): the requirements JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m lab.kernel.trace")
    parser.add_argument("--run", type=Path, required=True, metavar="DIR", help="empty work directory (created)")
    parser.add_argument("--esp", required=True, help="mounted vfat ESP, FAT image or IMG:N")
    parser.add_argument("--only", action="append", default=[], help="phase name prefix (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="independent phase groups run at a time")
    parser.add_argument("--timings", type=Path, help="write each phase's seconds here (JSON)")
    args = parser.parse_args(argv)
    args.run.mkdir(parents=True, exist_ok=False)
    timings: dict[str, float] = {}
    try:
        trace = run_workload(args.run, args.esp, only=tuple(args.only), traced_on=GUEST_TRACED_ON, jobs=args.jobs,
                             timings=timings)
    except StonelabError as err:
        print(f"stonelab: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(args.run, ignore_errors=True)
        if args.timings:
            args.timings.write_text(json.dumps(timings, indent=1, sort_keys=True))
    sys.stdout.write(trace.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
