"""What the reference implementation asks of a kernel — traced, not guessed.

Runs a representative workload of the reference package manager (install, upgrade, rollback, prune, verify,
for both swap strategies) under ``strace -f`` and reduces every system call to a *feature*: the call plus the
argument that decides whether a kernel supports it (``renameat2:RENAME_EXCHANGE``, ``unshare:CLONE_NEWNS``,
``ioctl:FICLONE``, ``mount:MS_BIND``…), with how often each phase used it and which errors it saw.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference_impl.stone import PackageSpec, build_package_from_files
from stonelab.errors import StonelabError

# Calls whose outcome decides whether a transaction or a boot sync can work; everything else the interpreter
# needs to run at all ("runtime").
TRANSACTION_CALLS = {
    "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat", "unlink",
    "unlinkat", "rmdir", "open", "openat", "creat", "fsync", "fdatasync", "syncfs", "sync", "flock", "fcntl",
    "ioctl", "copy_file_range", "sendfile", "fchmod", "fchmodat", "fchown", "fchownat", "chmod", "chown",
    "lchown", "utimensat", "mount", "umount2", "unshare", "chroot", "pivot_root", "prlimit64", "setrlimit",
    "readlink", "readlinkat", "getdents64", "statx", "newfstatat", "fstat", "lstat", "stat", "statfs", "fstatfs",
    "pread64", "pwrite64", "ftruncate", "fallocate", "faccessat", "faccessat2", "access",
}
TERMINAL_IOCTLS = {"TCGETS", "TIOCGWINSZ", "TCSETS", "FIONBIO", "FIOCLEX"}
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?:<\.\.\. (?P<resumed>\w+) resumed>(?P<rest>.*)|(?P<name>\w+)\((?P<args>.*))$")
_RESULT = re.compile(r"\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)(?:\s+(?P<errno>E[A-Z0-9]+))?")
_OPEN_FLAGS = ("O_DIRECTORY", "O_TMPFILE", "O_PATH", "O_NOFOLLOW", "O_EXCL")


@dataclass
class Feature:
    key: str  # "renameat2:RENAME_EXCHANGE"
    syscall: str
    detail: str
    category: str  # transaction | runtime
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)


@dataclass
class Trace:
    features: list[Feature]
    phases: list[str]
    kernel: str

    def to_json(self) -> str:
        return json.dumps({"kernel": self.kernel, "phases": self.phases,
                           "features": [asdict(f) for f in self.features]}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "trace") -> Trace:
        try:
            data = json.loads(text)
            return cls([Feature(**f) for f in data["features"]], data["phases"], data["kernel"])
        except (ValueError, KeyError, TypeError) as err:
            raise StonelabError(f"{where}: not a stonelab kernel trace ({err})") from None

    def feature(self, key: str) -> Feature | None:
        return next((f for f in self.features if f.key == key), None)


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


def feature_detail(name: str, args: list[str]) -> str:
    def arg(i: int) -> str:
        return args[i] if len(args) > i else ""
    if name == "renameat2":
        return arg(4) or "0"
    if name == "linkat":
        return arg(4) or "0"
    if name in ("openat", "open"):
        flags = arg(2 if name == "openat" else 1)
        return "|".join(f for f in _OPEN_FLAGS if f in flags)
    if name in ("unshare", "chroot"):
        return arg(0) if name == "unshare" else ""
    if name == "mount":
        fstype = arg(2).strip('"')
        flags = "|".join(sorted(f for f in arg(3).split("|") if f.startswith("MS_")))
        return ":".join(p for p in (fstype if fstype != "NULL" else "", flags) if p)
    if name == "ioctl":
        request = arg(1)
        return "FICLONE" if "FICLONE" in request else request.split(" ")[0]
    if name in ("flock", "fcntl"):
        return arg(1)
    if name in ("prlimit64", "setrlimit"):
        return arg(1) if name == "prlimit64" else arg(0)
    if name == "umount2":
        return arg(1)
    return ""


def parse_strace(text: str, phase: str, into: dict[str, Feature]) -> None:
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
        key = f"{name}:{detail}" if detail else name
        feature = into.get(key)
        if feature is None:
            category = "transaction" if name in TRANSACTION_CALLS and detail not in TERMINAL_IOCTLS else "runtime"
            feature = into[key] = Feature(key, name, detail, category)
        feature.calls += 1
        if phase not in feature.phases:
            feature.phases.append(phase)
        if result and result["errno"]:
            feature.errors[result["errno"]] = feature.errors.get(result["errno"], 0) + 1


@dataclass(frozen=True)
class Phase:
    name: str
    argv: list[str]


BUSYBOX = Path("/bin/busybox")
TRIGGER = """\
name: trace-trigger
description: a transaction trigger, so the sandbox's namespace and mount calls are traced
handlers:
    touch:
        run: /usr/bin/busybox
        args: ["touch", "/usr/share/tool/triggered"]
paths:
    "/usr/share/tool/*":
        handlers: [touch]
"""


def _package(out: Path, name: str, version: str, files: dict[str, str | bytes],
             executable: tuple[str, ...] = ()) -> Path:
    spec = PackageSpec(name=name, version=version, release=int(version), summary="trace workload",
                       license=["MPL-2.0"], modes={rel: 0o755 for rel in executable if rel in files})
    return build_package_from_files(files, spec, out / f"{name}-{version}.stone",
                                    symlinks={f"bin/{name}-link": Path(next(iter(files))).name}, level=3)


def workload(workdir: Path) -> list[Phase]:
    """The phases traced: every verb of a transaction's life, for both swap strategies."""
    pkgs = workdir / "packages"
    v1 = _package(pkgs, "tool", "1", {"bin/tool": "one", "share/tool/empty": "", "share/tool/a": "a"}, ("bin/tool",))
    v2_files: dict[str, str | bytes] = {"bin/tool": "two", "share/tool/b": "b", "lib/libtool.so.2": "elf"}
    if BUSYBOX.is_file() and os.geteuid() == 0:  # the trigger sandbox needs root (mount namespaces)
        v2_files |= {"bin/busybox": BUSYBOX.read_bytes(), "share/moss/triggers/tx.d/trace.yaml": TRIGGER}
    v2 = _package(pkgs, "tool", "2", v2_files, ("bin/tool", "bin/busybox"))
    phases = []
    for strategy in ("exchange", "symlink"):
        root = workdir / f"root-{strategy}"
        root.mkdir()
        common = ["-D", str(root), "--swap", strategy]
        phases += [Phase(f"{strategy}:install", ["install", *common, str(v1)]),
                   Phase(f"{strategy}:upgrade", ["install", *common, str(v2)]),
                   Phase(f"{strategy}:rollback", ["state", "activate", *common, "1"]),
                   Phase(f"{strategy}:prune", ["state", "prune", *common, "--keep", "1"]),
                   Phase(f"{strategy}:verify", ["state", "verify", *common])]
    return phases


def trace_reference(workdir: Path | None = None, strace: str | None = None) -> Trace:
    strace = strace or shutil.which("strace")
    if not strace:
        raise StonelabError("strace is not installed (Debian package strace)")
    features: dict[str, Feature] = {}
    with tempfile.TemporaryDirectory(prefix="stonelab-trace-", dir=workdir) as tmp:
        work = Path(tmp)
        phases = workload(work)
        for phase in phases:
            log = work / f"{phase.name.replace(':', '-')}.strace"
            argv = [strace, "-f", "-qq", "-s", "256", "-o", str(log), sys.executable, "-m", "stonelab.cli",
                    *phase.argv]
            proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), timeout=600)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                raise StonelabError(f"traced phase {phase.name} failed: {tail}")
            parse_strace(log.read_text(errors="replace"), phase.name, features)
    ordered = sorted(features.values(), key=lambda f: (f.category != "transaction", f.syscall, f.detail))
    return Trace(ordered, [p.name for p in phases], os.uname().release)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STONELAB_FAULT"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env
