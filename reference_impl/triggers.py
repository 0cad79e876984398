"""Transaction triggers: the YAML files in ``usr/share/moss/triggers/tx.d/*.yaml`` of the new tree, run in a
mount-namespace sandbox after the blit and before the ``/usr`` swap.

Format (as upstream moss reads it, ``crates/triggers/src/format.rs`` in AerynOS/os-tools; real files:
``g/glib2/pkg/trigger.yaml``, ``k/kmod/pkg/trigger.yaml`` in AerynOS/recipes)::

    name: depmod                       # required, unique over all loaded triggers
    description: |                     # required
        Update kernel module dependencies
    after: other_trigger               # optional: run after / before the trigger of that name
    before: another_trigger            #   (names that are not loaded are ignored, as upstream does)
    inhibitors:                        # optional
        paths: [/etc/some/file]        #   skip the trigger when one of these exists in the target
        environment: [chroot, live]    #   parsed, not acted on (upstream acts on neither list)
    handlers:                          # required: named handlers
        depmod:
            run: /usr/sbin/depmod      #   absolute program path inside the sandbox
            args: ["-a", "$(version)"] #   ``$(name)`` is replaced by the capture ``name``
        cleanup:
            delete: ["/usr/lib/modules/$(version)/stale"]
    paths:                             # required: pattern -> handlers to run when something matches
        "/usr/lib/modules/(version:*)/*":
            handlers: [depmod]
            type: directory            #   optional filter: directory | symlink

Patterns match absolute paths (``/usr/...``) of every entry of the staged tree: ``**`` matches anything, ``*``
anything but ``/``, ``?`` any one character (upstream compiles it to regex ``.``, so it matches ``/`` too),
``(name:subpattern)`` captures; all other characters are literal (upstream pastes them into a regex unescaped; we
escape them). The whole path must match. Each trigger's handlers are compiled per match, identical commands are
collapsed, and the triggers are ordered by ``before``/``after`` (ties by name).

Where this reference differs from upstream, on purpose:
- a malformed file is an error naming the file (upstream silently skips files that fail to parse);
- ``type:`` filters matches (upstream parses and ignores it); ``inhibitors.paths`` is honoured;
- ``delete:`` is implemented (paths after capture substitution, confined to ``/usr``; upstream panics with todo!)
  and ``$(name)`` is substituted in it too;
- a handler exiting non-zero fails the transaction before the swap (upstream only logs a warning);
- an ordering cycle is an error (upstream silently drops the edge that would close it);
- the sandbox gets a reduced capability bounding set, a minimal environment (``PATH``, ``HOME``, ``LANG``), a
  read-only root, a private ``/tmp``, a fresh ``/proc`` in its own PID namespace, no network, no ``/sys`` and only
  null/zero/full/random/urandom/tty in ``/dev`` (upstream rbinds the host's ``/dev`` and ``/sys``).

The sandbox is a child process (``python -m reference_impl.triggers --sandbox-child``) that unshares mount, PID,
network, IPC and UTS namespaces, makes all mounts private, bind-mounts ``<root>/.moss/root/isolation`` read-only
onto itself, the staged ``usr`` read-write at ``isolation/usr`` and ``<root>/etc`` read-only at ``isolation/etc``,
forks (the child is PID 1 of the new PID namespace), switches root there with ``pivot_root`` + ``chroot`` and
detaches the old root (a bare chroot leaves the host reachable to a root process), drops the capabilities a trigger
never needs from the bounding set (``CAP_SYS_ADMIN``, ``CAP_MKNOD``, ``CAP_SYS_MODULE``, ...) and execs the
handler. Every mount lives in that namespace only, so it disappears with the child, also when it is killed; the
isolation skeleton is then removed.
"""
from __future__ import annotations

import ctypes
import errno
import heapq
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reference_impl.installation import ROOT_LINKS
from stonelab.errors import StonelabError
from stonelab.yamlfile import read_yaml

TX_DIR = Path("share/moss/triggers/tx.d")
SKELETON_DIRS = ("usr", "etc", "proc", "dev", "tmp", "old_root")
SANDBOX_ENV = {"PATH": "/usr/bin:/usr/sbin:/bin:/sbin", "HOME": "/", "LANG": "C.UTF-8"}
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
SETUP_FAILED = 125  # the sandbox child's status when it could not build the sandbox (message on stderr)
PATH_KINDS = ("directory", "symlink")


class TriggerError(StonelabError):
    pass


@dataclass(frozen=True)
class Handler:
    name: str
    run: str | None = None
    args: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathRule:
    pattern: str
    regex: re.Pattern[str]
    handlers: tuple[str, ...]
    kind: str | None = None  # "directory" | "symlink" | None (anything)


@dataclass(frozen=True)
class Trigger:
    name: str
    description: str
    file: Path
    handlers: dict[str, Handler]
    paths: tuple[PathRule, ...]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    inhibit_paths: tuple[str, ...] = ()
    inhibit_environment: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class Command:
    """One handler with its captures substituted: ``run`` + ``args``, or ``delete`` paths."""
    run: str = ""
    args: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()

    def __str__(self) -> str:
        return " ".join((self.run, *self.args)) if self.run else " ".join(("rm", "--", *self.delete))


@dataclass
class TriggerRun:
    trigger: str
    file: Path
    command: Command
    exit_status: int
    stdout: str
    stderr: str
    seconds: float
    sandboxed: bool = True


# -- loading --------------------------------------------------------------------------------------------------

def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The upstream glob dialect (see module docstring) as an anchored regex; ValueError when malformed."""
    regex, groups = _pattern_regex(pattern, top=True)
    return re.compile(f"^{regex}$")


def _pattern_regex(pattern: str, top: bool, groups: set[str] | None = None) -> tuple[str, set[str]]:
    groups = set() if groups is None else groups
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append(".")
        elif ch == "(":
            if not top:
                raise ValueError("nested capture group")
            end = pattern.find(")", i)
            if end < 0:
                raise ValueError("capture group without ')'")
            name, colon, sub = pattern[i + 1:end].partition(":")
            if not colon or ":" in sub or not name.isidentifier():
                raise ValueError(f"malformed capture group {pattern[i:end + 1]!r} (want (name:pattern))")
            if name in groups:
                raise ValueError(f"capture group {name!r} used twice")
            groups.add(name)
            inner, _ = _pattern_regex(sub, top=False, groups=groups)
            out.append(f"(?P<{name}>{inner})")
            i = end + 1
            continue
        elif ch == ")":
            raise ValueError("')' without '('")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out), groups


def _strings(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{what} must be a string or a list of strings")


def _parse_handler(name: str, data) -> Handler:
    if not isinstance(data, dict):
        raise ValueError(f"handler {name!r} must be a mapping with run/args or delete")
    if "run" in data and "delete" in data:
        raise ValueError(f"handler {name!r} has both run and delete")
    if "run" in data:
        run = data["run"]
        if not isinstance(run, str) or not run.startswith("/"):
            raise ValueError(f"handler {name!r}: run must be an absolute path")
        args = data.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                 for a in args):
            raise ValueError(f"handler {name!r}: args must be a list of strings")
        return Handler(name, run=run, args=tuple(str(a) for a in args))
    if "delete" in data:
        delete = _strings(data["delete"], f"handler {name!r}: delete")
        if not delete:
            raise ValueError(f"handler {name!r}: delete names no path")
        return Handler(name, delete=delete)
    raise ValueError(f"handler {name!r} has neither run nor delete")


def parse_trigger(path: Path) -> Trigger:
    """Read one trigger file; any problem is a one-line TriggerError naming the file."""
    data = read_yaml(path, error=TriggerError, kind="malformed trigger YAML")
    try:
        return _trigger_from(data, path)
    except ValueError as err:
        raise TriggerError(f"{path}: invalid trigger: {err}") from None


def _trigger_from(data, path: Path) -> Trigger:
    if not isinstance(data, dict):
        raise ValueError("the document must be a mapping")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    handlers_data = data.get("handlers")
    if not isinstance(handlers_data, dict) or not handlers_data:
        raise ValueError("handlers must be a non-empty mapping")
    handlers = {str(n): _parse_handler(str(n), h) for n, h in handlers_data.items()}
    paths_data = data.get("paths")
    if not isinstance(paths_data, dict) or not paths_data:
        raise ValueError("paths must be a non-empty mapping of pattern to handlers")
    rules = []
    for pattern, definition in paths_data.items():
        if not isinstance(pattern, str) or not isinstance(definition, dict):
            raise ValueError(f"path {pattern!r} must map to a mapping with handlers")
        used = _strings(definition.get("handlers"), f"path {pattern!r}: handlers")
        if not used:
            raise ValueError(f"path {pattern!r} names no handlers")
        for name in used:
            if name not in handlers:
                raise ValueError(f"path {pattern!r} uses the undefined handler {name!r}")
        kind = definition.get("type")
        if kind is not None and kind not in PATH_KINDS:
            raise ValueError(f"path {pattern!r}: type must be one of {', '.join(PATH_KINDS)}")
        try:
            regex = compile_pattern(pattern)
        except (ValueError, re.error) as err:
            raise ValueError(f"path {pattern!r}: {err}") from None
        rules.append(PathRule(pattern, regex, used, kind))
    inhibitors = data.get("inhibitors") or {}
    if not isinstance(inhibitors, dict):
        raise ValueError("inhibitors must be a mapping with paths and environment")
    return Trigger(name=data["name"].strip(), description=data["description"].strip(), file=path,
                   handlers=handlers, paths=tuple(rules),
                   before=_strings(data.get("before"), "before"), after=_strings(data.get("after"), "after"),
                   inhibit_paths=_strings(inhibitors.get("paths"), "inhibitors.paths"),
                   inhibit_environment=_strings(inhibitors.get("environment"), "inhibitors.environment"))


def load_triggers(staging_usr: Path) -> list[Trigger]:
    """Every ``share/moss/triggers/tx.d/*.yaml`` below ``staging_usr``, in file-name order."""
    directory = Path(staging_usr) / TX_DIR
    if not directory.is_dir():
        return []
    triggers: list[Trigger] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        if not path.is_file():
            continue
        trigger = parse_trigger(path)
        if trigger.name in seen:
            raise TriggerError(f"{path}: trigger name {trigger.name!r} is already defined in {seen[trigger.name]}")
        seen[trigger.name] = path
        triggers.append(trigger)
    return triggers


# -- matching and ordering ------------------------------------------------------------------------------------

def staged_paths(staging_usr: Path) -> list[tuple[str, str]]:
    """``(absolute path as seen in the sandbox, kind)`` for every entry below ``staging_usr``."""
    result = []
    for directory, dirs, files in os.walk(staging_usr):
        rel = os.path.relpath(directory, staging_usr)
        base = "/usr" if rel == "." else "/usr/" + rel
        for name in dirs:
            kind = "symlink" if os.path.islink(os.path.join(directory, name)) else "directory"
            result.append((f"{base}/{name}", kind))
        for name in files:
            kind = "symlink" if os.path.islink(os.path.join(directory, name)) else "file"
            result.append((f"{base}/{name}", kind))
    result.sort()
    return result


def _substitute(text: str, captures: dict[str, str]) -> str:
    for key, value in captures.items():
        text = text.replace(f"$({key})", value)
    return text


def commands_for(trigger: Trigger, paths: list[tuple[str, str]]) -> list[Command]:
    """The trigger's compiled, de-duplicated commands for the matching paths (sorted, as upstream's set is)."""
    commands: set[Command] = set()
    for rule in trigger.paths:
        for path, kind in paths:
            if rule.kind is not None and kind != rule.kind:
                continue
            match = rule.regex.match(path)
            if match is None:
                continue
            captures = {k: v for k, v in match.groupdict().items() if v is not None}
            for name in rule.handlers:
                handler = trigger.handlers[name]
                if handler.run:
                    commands.add(Command(run=_substitute(handler.run, captures),
                                         args=tuple(_substitute(a, captures) for a in handler.args)))
                else:
                    commands.add(Command(delete=tuple(_substitute(d, captures) for d in handler.delete)))
    return sorted(commands, key=lambda c: (c.run == "", c))


def order_triggers(triggers: list[Trigger]) -> list[Trigger]:
    """Topological order over before/after (unknown names ignored), ties broken by name; a cycle is an error."""
    by_name = {t.name: t for t in triggers}
    successors: dict[str, set[str]] = {name: set() for name in by_name}
    for trigger in triggers:
        for other in trigger.before:
            if other in by_name and other != trigger.name:
                successors[trigger.name].add(other)
        for other in trigger.after:
            if other in by_name and other != trigger.name:
                successors[other].add(trigger.name)
    indegree = {name: 0 for name in by_name}
    for name, nexts in successors.items():
        for n in nexts:
            indegree[n] += 1
    ready = [name for name, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(by_name[name])
        for n in successors[name]:
            indegree[n] -= 1
            if indegree[n] == 0:
                heapq.heappush(ready, n)
    if len(ordered) != len(triggers):
        stuck = sorted(name for name, d in indegree.items() if d > 0)
        files = ", ".join(str(by_name[n].file) for n in stuck)
        raise TriggerError(f"trigger ordering cycle between {', '.join(stuck)} (before/after in {files})")
    return ordered


def _inhibited(trigger: Trigger, root: Path, staging_usr: Path) -> bool:
    for path in trigger.inhibit_paths:
        rel = path.lstrip("/")
        if rel == "usr" or rel.startswith("usr/"):
            host = staging_usr / rel[4:] if rel != "usr" else staging_usr
        else:
            host = root / rel
        if os.path.lexists(host):
            return True
    return False


def plan(root: Path, staging_usr: Path) -> list[tuple[Trigger, list[Command]]]:
    """What would run, in order: triggers with at least one command, not inhibited."""
    triggers = load_triggers(staging_usr)
    if not triggers:
        return []
    paths = staged_paths(staging_usr)
    result = []
    for trigger in order_triggers(triggers):
        commands = commands_for(trigger, paths)
        if commands and not _inhibited(trigger, Path(root), Path(staging_usr)):
            result.append((trigger, commands))
    return result


# -- running --------------------------------------------------------------------------------------------------

def run_transaction_triggers(root: Path, staging_usr: Path, *, sandbox: bool = True,
                             timeout: float = 600.0) -> list[TriggerRun]:
    """Run the staged tree's transaction triggers; the first failing handler raises TriggerError."""
    root, staging_usr = Path(root), Path(staging_usr)
    if not staging_usr.is_dir():
        raise TriggerError(f"{staging_usr}: staged usr tree does not exist")
    work = plan(root, staging_usr)
    runs: list[TriggerRun] = []
    if not work:
        return runs
    isolation = root / ".moss" / "root" / "isolation"
    if sandbox:
        _build_skeleton(isolation)
    try:
        for trigger, commands in work:
            for command in commands:
                run = (_run_sandboxed if sandbox else _run_direct)(trigger, command, root, staging_usr,
                                                                    isolation, timeout)
                runs.append(run)
                if run.exit_status != 0:
                    raise TriggerError(_failure(run))
    finally:
        if sandbox:
            _remove_skeleton(isolation)
    return runs


def _failure(run: TriggerRun) -> str:
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output on stderr"
    status = (f"was killed by signal {-run.exit_status}" if run.exit_status < 0
              else f"exited {run.exit_status}")
    return f"trigger {run.trigger} ({run.file}): {run.command} {status}: {last}"


def _mounts_below(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _build_skeleton(isolation: Path) -> None:
    if os.path.lexists(isolation):
        _remove_skeleton(isolation)
    try:
        isolation.mkdir(parents=True)
        for name in SKELETON_DIRS:
            (isolation / name).mkdir()
        for link, target in ROOT_LINKS.items():
            os.symlink(target, isolation / link)
    except OSError as err:
        raise TriggerError(f"{isolation}: cannot build the trigger sandbox: {err.strerror}") from None


def _remove_skeleton(isolation: Path) -> None:
    """Remove the isolation dir; refuse (rather than delete through them) if something is still mounted there."""
    if not os.path.lexists(isolation):
        return
    mounted = _mounts_below(isolation)
    if mounted:
        raise TriggerError(f"{isolation}: still has mounts ({mounted[0]}); unmount them before the next transaction")
    try:
        shutil.rmtree(isolation)
    except OSError as err:
        raise TriggerError(f"{isolation}: cannot remove the trigger sandbox: {err.strerror}") from None


def _child_env() -> dict[str, str]:
    env = dict(SANDBOX_ENV)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    return env


def _run_sandboxed(trigger: Trigger, command: Command, root: Path, staging_usr: Path, isolation: Path,
                   timeout: float) -> TriggerRun:
    etc = root / "etc"
    spec = {"isolation": str(isolation.resolve()), "usr": str(staging_usr.resolve()),
            "etc": str(etc.resolve()) if etc.is_dir() else None,
            "run": command.run, "args": list(command.args), "delete": list(command.delete)}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "reference_impl.triggers", "--sandbox-child", json.dumps(spec)],
                              capture_output=True, timeout=timeout, env=_child_env(), cwd="/")
    except subprocess.TimeoutExpired:
        raise TriggerError(f"trigger {trigger.name} ({trigger.file}): {command} timed out after {timeout:g}s") \
            from None
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == SETUP_FAILED and "stonelab-sandbox:" in stderr:
        message = stderr.split("stonelab-sandbox:", 1)[1].strip().splitlines()[0]
        raise TriggerError(f"trigger {trigger.name} ({trigger.file}): cannot build the sandbox at {isolation}: "
                           f"{message} (needs root or CAP_SYS_ADMIN)")
    return TriggerRun(trigger.name, trigger.file, command, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                      stderr, time.monotonic() - started)


def _run_direct(trigger: Trigger, command: Command, root: Path, staging_usr: Path, isolation: Path,
                timeout: float) -> TriggerRun:
    """No sandbox (tests that ask for it): ``/usr/...`` in ``run`` and ``delete`` maps to the staged tree."""
    started = time.monotonic()
    if not command.run:
        try:
            for path in command.delete:
                _delete_inside(staging_usr, path)
        except (OSError, ValueError) as err:
            return TriggerRun(trigger.name, trigger.file, command, 1, "", str(err), time.monotonic() - started, False)
        return TriggerRun(trigger.name, trigger.file, command, 0, "", "", time.monotonic() - started, False)
    program = command.run
    if program == "/usr" or program.startswith("/usr/"):
        program = str(staging_usr / program[5:])
    env = {**SANDBOX_ENV, "PATH": f"{staging_usr / 'bin'}:{staging_usr / 'sbin'}"}
    try:
        proc = subprocess.run([program, *command.args], capture_output=True, timeout=timeout, env=env,
                              cwd=staging_usr.parent)
    except subprocess.TimeoutExpired:
        raise TriggerError(f"trigger {trigger.name} ({trigger.file}): {command} timed out after {timeout:g}s") \
            from None
    except OSError as err:
        return TriggerRun(trigger.name, trigger.file, command, 127, "", f"{program}: {err.strerror}",
                          time.monotonic() - started, False)
    return TriggerRun(trigger.name, trigger.file, command, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                      proc.stderr.decode("utf-8", "replace"), time.monotonic() - started, False)


def _delete_inside(usr: Path, path: str) -> None:
    """Remove ``path`` (``/usr/...``) from the tree at ``usr`` without following symlinks out of it."""
    if not (path == "/usr" or path.startswith("/usr/")) or ".." in path.split("/"):
        raise ValueError(f"delete: {path} is not a path inside /usr")
    rel = path[5:].strip("/")
    if not rel:
        raise ValueError("delete: refusing to delete /usr itself")
    target = usr / rel
    real_parent = os.path.realpath(target.parent)
    if real_parent != os.path.realpath(usr) and not real_parent.startswith(os.path.realpath(usr) + os.sep):
        raise ValueError(f"delete: {path} leads outside /usr through a symlink")
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif os.path.lexists(target):
        target.unlink()


# -- the sandbox child ----------------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
SYS_PIVOT_ROOT = 155  # x86-64
# Dropped from the bounding set before the handler is executed: what a trigger never needs and what would let it
# leave the sandbox (mount, load modules, make device nodes, raw I/O, ptrace the host, reboot, chroot again).
DROPPED_CAPS = {"CAP_LINUX_IMMUTABLE": 9, "CAP_NET_ADMIN": 12, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
                "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22,
                "CAP_SYS_TIME": 25, "CAP_MKNOD": 27, "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34,
                "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_SETPCAP": 8}


class _Setup(Exception):
    pass


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise _Setup(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    _check(libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), None), what)


def _bind(libc, source: str, target: str, read_only: bool) -> None:
    _mount(libc, source, target, None, MS_BIND | MS_REC, f"bind {source} on {target}")
    if read_only:
        _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
               f"remount {target} read-only")


def _sandbox_child(spec: dict) -> int:
    """Runs as ``python -m reference_impl.triggers --sandbox-child SPEC``; never returns to a caller's code."""
    libc = _libc()
    iso = spec["isolation"]
    try:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0:
            if ctypes.get_errno() != errno.EINVAL:
                _check(-1, "unshare(CLONE_NEWNS|CLONE_NEWPID|...)")
            # kernels with fewer namespaces (Asterinas: mount, UTS, IPC, cgroup only) get the mount sandbox,
            # which is what keeps /etc read-only and the host out of reach; PID and network stay shared
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWIPC|...)")
            sys.stderr.write("stonelab-sandbox: no PID/network namespaces on this kernel; mount namespace only\n")
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, "make / private")
        _mount(libc, iso, iso, None, MS_BIND, f"bind {iso} on itself")
        _mount(libc, None, iso, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
               f"remount {iso} read-only")
        _bind(libc, spec["usr"], f"{iso}/usr", read_only=False)
        if spec["etc"]:
            _bind(libc, spec["etc"], f"{iso}/etc", read_only=True)
        _mount(libc, "tmpfs", f"{iso}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mount tmpfs on /tmp")
        _mount(libc, "tmpfs", f"{iso}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mount tmpfs on /dev")
        for node in DEV_NODES:
            if os.path.exists(f"/dev/{node}"):
                open(f"{iso}/dev/{node}", "w").close()
                _mount(libc, f"/dev/{node}", f"{iso}/dev/{node}", None, MS_BIND, f"bind /dev/{node}")
    except (_Setup, OSError) as err:
        sys.stderr.write(f"stonelab-sandbox: {err}\n")
        return SETUP_FAILED
    sys.stdout.flush()
    pid = os.fork()  # the first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace
    if pid == 0:
        try:
            _check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
            _mount(libc, "proc", f"{iso}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mount /proc")
            # pivot_root rather than a bare chroot: with the old root detached nothing of the host is reachable
            os.chdir(iso)
            _check(libc.syscall(SYS_PIVOT_ROOT, b".", b"old_root"), "pivot_root")
            os.chroot(".")
            os.chdir("/")
            _check(libc.umount2(b"/old_root", MNT_DETACH), "detach the old root")
            for cap in DROPPED_CAPS.values():  # CAP_SETPCAP last: it is what allows the drops
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                    _check(-1, f"drop capability {cap} from the bounding set")
        except (_Setup, OSError) as err:
            sys.stderr.write(f"stonelab-sandbox: {err}\n")
            sys.stderr.flush()
            os._exit(SETUP_FAILED)
        if spec["run"]:
            try:
                os.execve(spec["run"], [spec["run"], *spec["args"]], dict(SANDBOX_ENV))
            except OSError as err:
                sys.stderr.write(f"{spec['run']}: {err.strerror}\n")
                sys.stderr.flush()
                os._exit(127)
        try:
            for path in spec["delete"]:
                _delete_inside(Path("/usr"), path)
        except (OSError, ValueError) as err:
            sys.stderr.write(f"{err}\n")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--sandbox-child":
    sys.exit(_sandbox_child(json.loads(sys.argv[2])))
