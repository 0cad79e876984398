"""Explore one recorded operation: enumerate its crash states, build and check them all in one guest, report.

``explore(target, start, end, oracle, options)`` takes the recording target's current generation (its untouched
starting image and its write log), the timeline marks of the operation, and the lab's oracle; it returns an
:class:`Exploration`: states checked, states per flush boundary, distinct violations each with the smallest
write set that shows it, and — when ``options.out_dir`` is given — a reproducer file per violation
(``lab/crash/replay.py``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.crash.check import Oracle, judge
from lab.crash.enumerate import Window, enumerate_states
from lab.crash.logwrites import Recording, read_log
from lab.crash.materialize import Job, write_job
from lab.crash.model import CrashState, Granularity, Model, PowerLoss
from lab.crash.replay import Reproducer, write_reproducer
from stonelab.errors import StonelabError

SECONDS_PER_STATE = 60.0  # guest time budget per state (TCG on a loaded machine) before the job counts as hung


@dataclass(frozen=True)
class ExploreOptions:
    """``max_states``/``seed``: the bound and the sampling seed; ``out_dir``: where reproducers go (None: none)."""

    model: Model = Model.VOLATILE_CACHE
    granularity: Granularity = Granularity.REQUEST
    max_states: int = 200
    seed: int = 0
    out_dir: Path | None = None

    @property
    def power(self) -> PowerLoss:
        return PowerLoss(self.model, self.granularity)


@dataclass
class CrashViolation:
    """A distinct violation: invariant and detail, how many states show it, the smallest such state."""

    invariant: str
    detail: str
    states: int
    boundary: int
    cut: int
    write_set: str
    after_return: bool
    reproducer: str | None = None


@dataclass
class Exploration:
    """What an exploration found (JSON-ready with ``to_dict``)."""

    model: str
    model_description: str
    window: dict
    states: int = 0
    per_boundary: dict[str, int] = field(default_factory=dict)
    per_kind: dict[str, int] = field(default_factory=dict)
    violations: list[CrashViolation] = field(default_factory=list)
    failing_states: int = 0
    failing_per_kind: dict[str, int] = field(default_factory=dict)  # subset/sample: only a volatile cache
    seconds: float = 0.0
    guest_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # mean per state, in the guest
    guest_notes: list[str] = field(default_factory=list)  # the guest job's own warnings (a device held, …)

    @property
    def states_per_minute(self) -> float:
        return 60.0 * self.states / self.guest_seconds if self.guest_seconds else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), states_per_minute=round(self.states_per_minute, 1))

    def summary(self) -> str:
        found = ", ".join(sorted({v.invariant for v in self.violations})) or "no violations"
        return (f"{self.states} crash states ({self.model}): {found}; "
                f"{self.failing_states} failing states, {len(self.violations)} distinct violations")


def build_job(recording: Recording, states: list[CrashState], power: PowerLoss, *, device: str,
              partition: tuple[int, int], recovery: list[str], system: str = "reference", system_root: str = "",
              fstype: str = "ext4") -> tuple[Job, bytes]:
    """The guest job for ``states``: each distinct write piece once, clipped to the root partition.
    ``system``/``system_root``: a real system and its root below the file system (see :class:`Job`)."""
    start, length = partition
    chunk_ids: dict[tuple[int, int, int], int] = {}
    chunks: list[tuple[int, int, int]] = []
    blob = bytearray()

    def chunk(entry, first: int, count: int) -> int | None:
        key = (entry.index, first, count)
        if key not in chunk_ids:
            size = recording.sector_size
            lo, hi = (entry.sector + first) * size, (entry.sector + first + count) * size
            lo_clip, hi_clip = max(lo, start), min(hi, start + length)
            if lo_clip >= hi_clip:
                chunk_ids[key] = -1  # outside the root file system (the ESP, the GPT): not part of a state
            else:
                data = recording.read(entry, first, count)[lo_clip - lo:hi_clip - lo]
                chunk_ids[key] = len(chunks)
                chunks.append((lo_clip - start, len(blob), len(data)))
                blob.extend(data)
        return None if chunk_ids[key] < 0 else chunk_ids[key]

    common_boundary = min((s.boundary for s in states), default=0)
    common = [c for c in (chunk(e, 0, e.nr_sectors) for e in recording.entries[:common_boundary] if e.is_write)
              if c is not None]
    per_state = []
    for state in states:
        pieces = [piece for piece in power.writes(recording, state) if piece[0].index >= common_boundary]
        per_state.append([c for c in (chunk(*p) for p in pieces) if c is not None])
    return Job(device=device, chunks=chunks, common=common, states=per_state, recovery=recovery, system=system,
               system_root=system_root, fstype=fstype), bytes(blob)


def explore(target, start_bytes: int, end_bytes: int, exit_status: int, oracle: Oracle, recovery: list[str],
            options: ExploreOptions = ExploreOptions(), *, system_root: str = "") -> Exploration:
    """Explore the operation between two timeline marks of ``target`` (a recording VmTarget).  The system under
    test is ``oracle.system``; a real one is observed at ``system_root`` below the root file system (``recovery``
    is the reference's verb and unused then)."""
    started = time.monotonic()
    generation = target.generation
    if generation is None:
        raise StonelabError("crash exploration needs a recording target (VmTarget with record=True)")
    recording = read_log(generation.log)
    window = Window(recording.position(start_bytes), recording.position(end_bytes), exit_status)
    power = options.power
    states = enumerate_states(recording, window, power, max_states=options.max_states, seed=options.seed)
    result = Exploration(str(options.model), power.describe(), asdict(window))
    job, data = build_job(recording, states, power, device=target.base_partition,
                          partition=target.root_partition, recovery=recovery, system=oracle.system,
                          system_root=system_root, fstype=target.root_fs)
    with tempfile.TemporaryDirectory(prefix="crash-job-", dir=target.workdir) as tmp:
        write_job(Path(tmp), job, data)
        guest_started = time.monotonic()
        run = target.run_guest(["-m", "lab.crash.materialize", tmp], timeout=60 + SECONDS_PER_STATE * len(states))
        result.guest_seconds = time.monotonic() - guest_started
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if run.exit_code != 0 or len(lines) != len(states):
        raise StonelabError(f"crash-state check in the guest failed after {len(lines)} of {len(states)} states "
                            f"(exit {run.exit_code}): {run.stderr.strip()[-400:]}")
    result.guest_notes = [line for line in run.stderr.splitlines() if line.startswith("stonelab-crash:")]
    found: dict[tuple[str, str], list[CrashState]] = {}
    for state, outcome in zip(states, lines):
        violations = judge(outcome, oracle, state.after_return)
        result.failing_states += bool(violations)
        if violations:
            result.failing_per_kind[state.kind] = result.failing_per_kind.get(state.kind, 0) + 1
        for v in violations:
            found.setdefault((v.invariant, v.detail), []).append(state)
    result.states = len(states)
    phases = Counter()
    for outcome in lines:
        phases.update(outcome.get("phases") or {})
    result.phase_seconds = {k: round(v / len(lines), 3) for k, v in phases.items()} if lines else {}
    result.per_boundary = dict(sorted(Counter(f"flush boundary at entry {s.boundary}" for s in states).items()))
    result.per_kind = dict(Counter(s.kind for s in states))
    for number, ((invariant, detail), shown) in enumerate(sorted(found.items())):
        smallest = min(shown, key=lambda s: (len(s.persisted), s.cut))
        violation = CrashViolation(invariant, detail, len(shown), smallest.boundary, smallest.cut,
                                   smallest.write_set(), smallest.after_return)
        if options.out_dir is not None:
            violation.reproducer = str(_reproducer(options, target, recording, smallest, oracle, job,
                                                   judge(lines[states.index(smallest)], oracle,
                                                         smallest.after_return), number))
        result.violations.append(violation)
    result.seconds = time.monotonic() - started
    return result


def _reproducer(options: ExploreOptions, target, recording: Recording, state: CrashState, oracle: Oracle,
                job: Job, verdict, number: int) -> Path:
    """Keep the recording (image + log, copied once per out_dir) and write one reproducer next to it."""
    out = Path(options.out_dir)
    keep = out / "recording"
    keep.mkdir(parents=True, exist_ok=True)
    generation = target.generation
    base = keep / f"base-gen{generation.number}.raw"
    log = keep / f"gen{generation.number}.log"
    if not base.exists():
        _copy_flat(generation.base, base, generation.base_format)
        shutil.copyfile(recording.path, log)
    repro = Reproducer(base=str(base.relative_to(out)), log=str(log.relative_to(out)), partition=list(target.root_partition),
                       model=str(options.model), granularity=str(options.granularity), cut=state.cut,
                       boundary=state.boundary, persisted=[[u.entry, u.first, u.count] for u in state.persisted],
                       after_return=state.after_return, oracle=oracle.to_dict(), recovery=job.recovery,
                       verdict=sorted({f"{v.invariant}: {v.detail}" for v in verdict}),
                       system_root=job.system_root, filesystem=job.fstype)
    return write_reproducer(out / f"repro-{number:03d}.json", repro)


def _copy_flat(source: Path, dest: Path, fmt: str) -> None:
    """A stand-alone raw copy of the generation's starting image (sparse; flattens a qcow2 chain)."""
    import subprocess
    proc = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", "-S", "4k", str(source), str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StonelabError(f"{dest}: qemu-img convert failed: {proc.stderr.strip()}")
