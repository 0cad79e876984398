"""Reproducers: one crash state in a small JSON file, and ``replay`` to build and check it again.

File format (``"format": "stonelab-crash-reproducer/1"``), paths relative to the file::

    {"format": ..., "base": "recording/base-gen1.raw",   # the image before the recording (raw, sparse)
     "log": "recording/gen1.log",                         # the dm-log-writes recording
     "partition": [OFFSET, LENGTH],                       # the root file system in the image, bytes
     "model": "volatile-cache", "granularity": "request",
     "cut": 812, "boundary": 790,                         # power failed at entry 812; entries < 790 flushed
     "persisted": [[795, 0, 0], ...],                     # in-flight units that reached the disk [entry, first, count]
     "after_return": true,                                # the operation had returned when the power failed
     "oracle": {"old": {...}, "new": {...}, "succeeded": true, "baseline": {...}, "invariants": [...]},
     "recovery": ["state", "list", "-D", "{root}", ...],  # the verb run on the mounted state (the reference)
     "verdict": ["atomic_usr: ...", ...],                 # what the exploration saw
     "system_root": "nix", "filesystem": "ext4"}          # a real system's root in the file system (oracle.system)

``stonelab crash replay FILE`` boots one guest with the base image as its only disk, applies the state's writes
(everything before the boundary, then the persisted units) to a device-mapper snapshot, mounts, recovers, checks
with the same oracle and prints the verdict — the same lines as ``verdict`` when the problem is reproducible.
A real system's reproducer (``oracle.system``: nix, ostree) is checked with that system's own recovery and
commands, which the guest runs from this machine's root over 9p.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stonelab.errors import StonelabError

FORMAT = "stonelab-crash-reproducer/1"
GUEST_JOB_DIR = "/tmp/stonelab-crash-replay"  # in the guest's own tmpfs


@dataclass
class Reproducer:
    base: str
    log: str
    partition: list[int]
    model: str
    granularity: str
    cut: int
    boundary: int
    persisted: list[list[int]]
    after_return: bool
    oracle: dict
    recovery: list[str]
    verdict: list[str] = field(default_factory=list)
    system_root: str = ""
    filesystem: str = "ext4"


def write_reproducer(path: Path, repro: Reproducer) -> Path:
    path.write_text(json.dumps(dict(asdict(repro), format=FORMAT), indent=1) + "\n")
    return path


def read_reproducer(path: Path) -> Reproducer:
    """Raises StonelabError naming the file on anything that is not a reproducer."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise StonelabError(f"{path}: cannot read the reproducer ({err.strerror})") from None
    except ValueError as err:
        raise StonelabError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise StonelabError(f"{path}: not a stonelab crash reproducer (format {FORMAT!r} expected)")
    import pydantic
    try:
        repro = pydantic.TypeAdapter(Reproducer).validate_python(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise StonelabError(f"{path}: malformed reproducer: {where}: {first['msg']}") from None
    if len(repro.partition) != 2 or min(repro.partition) < 0 or any(len(u) != 3 or min(u) < 0
                                                                     for u in repro.persisted):
        raise StonelabError(f"{path}: malformed reproducer: partition is [start, length] and each persisted "
                            f"unit [entry, first, count], none negative")
    return repro


def replay(path: Path, *, kernel=None, accel: str = "auto") -> list[str]:
    """Materialise and check the reproducer's state in a fresh guest; the verdict lines (empty: it holds)."""
    from lab.crash.check import Oracle, judge
    from lab.crash.explore import build_job
    from lab.crash.logwrites import read_log
    from lab.crash.materialize import job_files
    from lab.crash.model import CrashState, Granularity, Model, PowerLoss, Unit
    from vm.accel import AccelSelector
    from vm.host import default_kernel
    from vm.machine import PROJECT_DIR, Machine, agent_config
    from vm.qemu import DiskSpec

    path = Path(path)
    repro = read_reproducer(path)
    base, log = path.parent / repro.base, path.parent / repro.log
    for needed in (base, log):
        if not needed.is_file():
            raise StonelabError(f"{path}: {needed} is missing (keep the recording directory next to the file)")
    try:
        power = PowerLoss(Model(repro.model), Granularity(repro.granularity))
    except ValueError as err:
        raise StonelabError(f"{path}: {err}") from None
    recording = read_log(log, disk_bytes=base.stat().st_size)   # the base is raw
    if repro.cut > len(recording.entries) or repro.boundary > repro.cut:
        raise StonelabError(f"{path}: cut {repro.cut} / boundary {repro.boundary} do not fit the recording "
                            f"({len(recording.entries)} entries)")
    for entry, first, count in repro.persisted:
        if entry >= repro.cut or first + count > recording.entries[entry].nr_sectors:
            raise StonelabError(f"{path}: persisted unit [{entry}, {first}, {count}] is not part of a request "
                                f"before the cut ({repro.cut}) in the recording")
    state = CrashState(repro.cut, repro.boundary, tuple(Unit(*u) for u in repro.persisted), repro.after_return,
                       "replay")
    oracle = Oracle.from_dict(repro.oracle)
    job, data = build_job(recording, [state], power, device="/dev/vda2", partition=tuple(repro.partition),
                          recovery=repro.recovery, system=oracle.system, system_root=repro.system_root,
                          fstype=repro.filesystem)
    image = kernel or default_kernel()
    choice = AccelSelector().choose(image, accel)
    # the host root over 9p: a real system's reproducer runs that system's own programs (nix, ostree), which the
    # userland image does not carry (a reference reproducer could run on the image, which now has the crash tools)
    config = agent_config(image, choice, [DiskSpec(base, readonly=True)], userland="9p")
    with Machine(config, name="replay") as machine:  # the job goes to the guest's own tmpfs
        machine.succeed(["mkdir", "-p", GUEST_JOB_DIR])
        for name, content in job_files(job, data).items():
            machine.write_file(f"{GUEST_JOB_DIR}/{name}", content)
        run = machine.execute([sys.executable, "-m", "lab.crash.materialize", GUEST_JOB_DIR], 600,
                              cwd=str(PROJECT_DIR))
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if run.exit_code != 0 or len(lines) != 1:
        raise StonelabError(f"{path}: checking the state in the guest failed (exit {run.exit_code}): "
                            f"{run.stderr.strip()[-300:]}")
    return sorted({f"{v.invariant}: {v.detail}" for v in judge(lines[0], oracle, repro.after_return)})
