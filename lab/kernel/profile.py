"""Kernel profiles: what a kernel does with each feature, per filesystem — probed (the semantic probe's lines from a
real boot) or documented (published facts, each citing the upstream source file it comes from).

A feature key is ``syscall[:FLAG|FLAG…]`` as the trace writes it (``renameat2:RENAME_EXCHANGE``,
``unshare:CLONE_NEWPID``, ``mount:vfat``), or a need that is not one call (``durability``, ``writeback``,
``reboot:sync``, ``sysfs:block``).  A result is ``supported``, ``errno`` (with the errno name) or
``wrong-semantics`` (returned success but did not do what it promises), always with its evidence.

Profiles live in ``compat/profiles/NAME.json`` (probed, written by ``stonelab kernel probe --kernel``) or
``NAME.yaml`` (documented); ``--profile`` takes a name there or a path.
"""
from __future__ import annotations

import csv
import errno as errno_module
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stonelab.errors import StonelabError

PROJECT = Path(__file__).resolve().parents[2]
PROFILE_DIR = PROJECT / "compat" / "profiles"
SHARED_DATA = PROJECT.parent / "shared" / "data"
STATUSES = ("supported", "errno", "wrong-semantics")
WILDCARD = "*"


@dataclass(frozen=True)
class Result:
    """One feature on one filesystem: ``status`` in STATUSES, ``errno`` its name when status is ``errno``,
    ``evidence`` (what the probe saw, or the documented behaviour) and ``source`` (upstream files, documented
    profiles only)."""

    status: str
    errno: str = ""
    evidence: str = ""
    source: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "supported"

    def short(self) -> str:
        """``supported``, ``EINVAL`` or ``wrong-semantics``."""
        return self.errno if self.status == "errno" else self.status

    def to_json(self) -> dict:
        data = {"status": self.status, "errno": self.errno, "evidence": self.evidence}
        if self.source:
            data["source"] = list(self.source)
        return data


def flags_of(key: str) -> tuple[str, set[str]]:
    """``mount:tmpfs:MS_NOSUID|MS_NODEV`` → (``mount``, {tmpfs, MS_NOSUID, MS_NODEV})."""
    syscall, _, detail = key.partition(":")
    return syscall, {part for part in re.split(r"[:|]", detail) if part}


@dataclass
class KernelProfile:
    """``results``: feature key → filesystem (or ``*``) → Result.  ``syscalls``: implemented x86-64 numbers when
    a syscall table is known (a number outside it is ENOSYS).  ``facts``: what the profile rests on."""

    name: str
    kernel: str
    evidence: str  # probed | documented
    results: dict[str, dict[str, Result]]
    filesystems: list[str] = field(default_factory=list)
    persistent_root: str = ""
    syscalls: set[int] | None = None
    numbers: dict[str, int] = field(default_factory=dict)
    facts: str = ""

    def exact(self, key: str, filesystem: str) -> Result | None:
        per_fs = self.results.get(key)
        if per_fs is None:
            return None
        return per_fs.get(filesystem, per_fs.get(WILDCARD))

    def result(self, key: str, filesystem: str) -> Result | None:
        """The result for a requirement: its exact key, else the worst of the profile's features of the same
        syscall whose flags are all among the requirement's (``unshare:CLONE_NEWNS|CLONE_NEWPID`` is judged by
        ``unshare:CLONE_NEWNS`` and ``unshare:CLONE_NEWPID``), else ENOSYS when the syscall is not in the
        kernel's table; None when the profile does not know."""
        found = self.exact(key, filesystem)
        if found is not None:
            return found
        syscall, flags = flags_of(key)
        parts = []
        for other in self.results:
            other_call, other_flags = flags_of(other)
            if other_call == syscall and other_flags <= flags:
                result = self.exact(other, filesystem)
                if result is not None:
                    parts.append(result)
        bad = [r for r in parts if not r.ok]
        if bad:
            return bad[0]
        if parts:
            return parts[0]
        number = self.numbers.get(syscall)
        if self.syscalls is not None and number is not None and number not in self.syscalls:
            return Result("errno", "ENOSYS", f"{syscall} ({number}) is not in the kernel's syscall table")
        return None

    def judged_filesystem(self, requested: str | None, where: str) -> str:
        """``requested``, or the profile's persistent root (else its first filesystem); a StonelabError naming
        ``where`` when the profile has no results for it."""
        filesystem = requested or self.persistent_root or next(iter(self.filesystems), "ext2")
        known = (set(self.filesystems) | {fs for per_fs in self.results.values() for fs in per_fs}) - {WILDCARD}
        if known and filesystem not in known:
            raise StonelabError(f"{where}: {self.name} has no results for filesystem {filesystem} "
                                f"(has: {', '.join(sorted(known))})")
        return filesystem

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "kernel": self.kernel, "evidence": self.evidence,
                           "facts": self.facts, "filesystems": self.filesystems,
                           "persistent_root": self.persistent_root,
                           "results": {k: {fs: r.to_json() for fs, r in sorted(v.items())}
                                       for k, v in sorted(self.results.items())}}, indent=1, sort_keys=False) + "\n"


def _result(value, where: str) -> Result:
    if isinstance(value, str):  # documented shorthand: supported | wrong-semantics | ERRNO
        if value in ("supported", "wrong-semantics"):
            return Result(value)
        if value in errno_module.__dict__ and value.startswith("E"):
            return Result("errno", value)
        raise StonelabError(f"{where}: {value!r} is not supported, wrong-semantics or an errno name")
    if not isinstance(value, dict) or value.get("status") not in STATUSES:
        raise StonelabError(f"{where}: a result needs a status ({', '.join(STATUSES)})")
    return Result(value["status"], value.get("errno", ""), value.get("evidence", ""), tuple(value.get("source", ())))


def linux_syscall_numbers(header: Path = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")) -> dict[str, int]:
    """x86-64 syscall names (as strace prints them) to numbers, from the kernel headers (linux-libc-dev)."""
    if not header.is_file():
        raise StonelabError(f"{header}: missing; it maps syscall names to numbers (Debian package linux-libc-dev)")
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", header.read_text())}


def _documented(data: dict, path: Path, shared_data: Path) -> KernelProfile:
    results: dict[str, dict[str, Result]] = {}
    for key, entry in (data.get("results") or {}).items():
        where = f"{path}: {key}"
        if not isinstance(entry, dict) or "fs" not in entry:
            raise StonelabError(f"{where}: needs fs (filesystem → result), 'evidence' and 'source'")
        source = tuple(entry.get("source") or ())
        if not source:
            raise StonelabError(f"{where}: a documented result must cite the upstream source file it comes from")
        evidence = str(entry.get("evidence", ""))
        results[key] = {}
        for fs, value in entry["fs"].items():
            base = _result(value, f"{where} on {fs}")
            results[key][fs] = Result(base.status, base.errno, evidence, source)
    syscalls = None
    if data.get("syscall_table"):
        table = shared_data / data["syscall_table"]
        if not table.is_file():
            raise StonelabError(f"{table}: the syscall table of {data['name']} is missing (it lives in ../shared/data)")
        with open(table, newline="") as handle:
            syscalls = {int(row["number"]) for row in csv.DictReader(handle, delimiter="\t")}
    return KernelProfile(data["name"], data.get("kernel", data["name"]), "documented", results,
                         list(data.get("filesystems", [])), data.get("persistent_root", ""), syscalls,
                         linux_syscall_numbers() if syscalls is not None else {}, str(data.get("facts", "")))


def load_profile(name_or_path: str, profile_dir: Path = PROFILE_DIR, shared_data: Path = SHARED_DATA) -> KernelProfile:
    """A profile by name (``compat/profiles/NAME.json|yaml``) or by path.  Raises StonelabError naming the file
    and the problem (unknown name, not a profile, a documented entry without a source)."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [profile_dir / f"{name_or_path}.json", profile_dir / f"{name_or_path}.yaml"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            known = sorted({p.stem for p in profile_dir.glob("*.*")})
            raise StonelabError(f"{name_or_path}: no kernel profile of that name or path (known: {', '.join(known)})")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise StonelabError(f"{path}: not a stonelab kernel profile (not UTF-8 text)") from None
    except OSError as err:
        raise StonelabError(f"{path}: cannot read the kernel profile ({err.strerror})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise StonelabError(f"{path}: not a stonelab kernel profile (malformed{at}: "
                            f"{getattr(err, 'problem', None) or 'cannot parse'})") from None
    if not isinstance(data, dict) or "name" not in data or "results" not in data:
        raise StonelabError(f"{path}: not a stonelab kernel profile (needs name and results)")
    results = data["results"]
    if not isinstance(results, dict) or not all(isinstance(entry, dict) for entry in results.values()):
        raise StonelabError(f"{path}: not a stonelab kernel profile (results must map each requirement to "
                            "its results per filesystem)")
    if data.get("evidence") == "documented":
        return _documented(data, path, shared_data)
    results = {key: {fs: _result(v, f"{path}: {key} on {fs}") for fs, v in per_fs.items()}
               for key, per_fs in data["results"].items()}
    return KernelProfile(data["name"], data.get("kernel", ""), data.get("evidence", "probed"), results,
                         list(data.get("filesystems", [])), data.get("persistent_root", ""),
                         facts=str(data.get("facts", "")))


_LINE = re.compile(r"STONELAB-PROBE (?P<label>\S+) (?P<key>\S+) (?P<status>supported|errno|wrong-semantics)"
                   r"(?: (?P<errno>E[A-Z0-9?]+) -?\d+)? -- (?P<evidence>.*)$")


def parse_probe_log(text: str, where: str) -> tuple[dict[str, dict[str, Result]], list[str]]:
    """The probe's lines (console noise around them ignored) → (results, labels that finished with ``done``).
    Raises StonelabError when the text holds no probe result at all."""
    results: dict[str, dict[str, Result]] = {}
    done = []
    for line in text.splitlines():
        line = line.strip().replace("\r", "")
        start = line.find("STONELAB-PROBE ")
        if start < 0:
            continue
        line = line[start:]
        words = line.split()
        if len(words) == 3 and words[2] == "done":
            done.append(words[1])
            continue
        match = _LINE.match(line)
        if match:
            results.setdefault(match["key"], {})[match["label"]] = Result(
                match["status"], match["errno"] or "", match["evidence"].strip())
    if not results:
        raise StonelabError(f"{where}: no STONELAB-PROBE results in it (did the probe run?)")
    return results, done


def probed_profile(name: str, kernel: str, text: str, where: str, *, persistent_root: str = "") -> KernelProfile:
    """A profile from the probe's console lines; each label is the filesystem it probed.  A filesystem whose
    run did not print ``done`` is named in ``facts`` as incomplete."""
    results, done = parse_probe_log(text, where)
    labels = sorted({fs for per_fs in results.values() for fs in per_fs})
    incomplete = [fs for fs in labels if fs not in done and fs != WILDCARD]
    facts = f"probed on {', '.join(labels)}" + (f"; incomplete: {', '.join(incomplete)}" if incomplete else "")
    return KernelProfile(name, kernel, "probed", results, labels, persistent_root, facts=facts)


def profile_summary(profile: KernelProfile) -> dict:
    """Counts by status (tests and the CLI)."""
    counts: dict[str, int] = {}
    for per_fs in profile.results.values():
        for result in per_fs.values():
            counts[result.short()] = counts.get(result.short(), 0) + 1
    return counts

