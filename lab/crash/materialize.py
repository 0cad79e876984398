"""Materialise crash states in the guest: device-mapper snapshots of the pre-recording image, no disk copies.

The host writes a *job* (``write_job``): ``job.json`` (the states, each a list of chunks) and ``data.bin`` (each
chunk's bytes once).  A chunk is a byte range of the root partition.  In the guest, which sees the untouched
pre-recording image read-only as a second disk, ``python -m lab.crash.materialize JOB_DIR`` (``run_job``):

1. loads ``dm-snapshot`` and ``brd``: RAM disks, one per snapshot in a batch, are the copy-on-write stores (a
   RAM disk takes memory only for the chunks written to it);
2. ``stonelab-crash-base`` = a non-persistent dm snapshot of the pristine partition; the writes every state shares
   (the log before the earliest flush boundary) are written into it once;
3. the states go in batches of :data:`BATCH`: one ``dmsetup create --concise`` makes a snapshot of the base for
   each state of the batch (``stonelab-crash-state``, each over its own RAM disk), and one ``dmsetup remove``
   removes them all afterwards — a helper process per state cost more than the state's own check under TCG;
4. for each state — in one forked worker per guest vCPU, each with its own mount point, as the states are
   independent file systems —: its own writes; ``mount(2)`` as ext4 (the guest kernel replays the journal) or
   ext2 (the job's ``fstype``); the system under test's recovery and observation — for the reference its recovery
   verb (forked again from the worker, which has imported it already) and ``lab.probe.observe``; for a real system
   (``system: nix|ostree``) ``lab.systems.crashcheck.observe_system`` on ``system_root`` below the mount: the
   system's own recovery, then its state read with its own commands and its integrity check; unmount.  One JSON
   line per state on stdout, in state order, with the seconds of each phase.

Every device, mount and loop device is removed on the way out, also when a state fails; they live only in the
guest, which the lab powers off afterwards in any case.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MOUNTPOINT = "/mnt/stonelab-crash"
BASE, TOP = "stonelab-crash-base", "stonelab-crash-state"  # + the job's pid (and the state's number)
BATCH = 16  # crash states whose snapshots one dmsetup call creates (and one removes)
MAX_WORKERS = 4  # states checked at once: one per guest vCPU, at most this many
# what the reference's recovery verbs run, imported before the forks so that no recovery pays for it (the verb
# modules themselves import lazily, for the sake of one-shot command lines)
PRELOAD = ("reference_impl.client", "reference_impl.recovery", "reference_impl.transaction")
RAM_DISK_KIB = 1 << 20  # each copy-on-write store: a brd RAM disk of 1 GiB, its pages allocated on first write
RAM_DISKS = 2 * BATCH + 1  # the base's, a batch's, and as many spares for devices the kernel still holds
RECOVERY_TIMEOUT = 120.0


@dataclass
class Job:
    """What the guest needs: the pristine partition, chunks (partition offset, data offset, length), the chunk
    ids every state shares, and per state its own chunk ids; the recovery command (stonelab CLI arguments,
    ``{root}`` replaced by the mount point)."""

    device: str
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    common: list[int] = field(default_factory=list)
    states: list[list[int]] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)
    system: str = "reference"
    system_root: str = ""
    fstype: str = "ext4"


def job_files(job: Job, data: bytes) -> dict[str, bytes]:
    """The job as the guest reads it: file name in the job directory → content."""
    return {"job.json": json.dumps(asdict(job)).encode(), "data.bin": data}


def write_job(directory: Path, job: Job, data: bytes) -> Path:
    """Write the job into ``directory`` (created), for a guest that sees the host's file system."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in job_files(job, data).items():
        (directory / name).write_bytes(content)
    return directory


def _run(*argv: str) -> str:
    env = dict(os.environ, DM_DISABLE_UDEV="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


def _sectors(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)


def _mount(device: str, target: str, fstype: str = "ext4") -> str | None:
    """mount(2) of an ext4/ext2 file system (no helper process: it costs as much as the mount under TCG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(device.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _unmount(target: str) -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _snapshot_table(origin: str, cow: str, sectors: int) -> str:
    """A non-persistent (``N``) snapshot of ``origin`` with 4 KiB chunks, its exceptions in ``cow``."""
    return f"0 {sectors} snapshot {origin} {cow} N 8"


def _create(devices: dict[str, str]) -> None:
    """Create every dm device of ``devices`` (name → table) with one ``dmsetup`` process."""
    _run("dmsetup", "create", "--concise", ";".join(f"{name},,,,{table}" for name, table in devices.items()))


def _remove(names: list[str]) -> list[str]:
    """Remove the dm devices ``names`` with one ``dmsetup`` process; one the kernel still holds is retried, then
    removed as soon as it is released (``--deferred``).  Returns those deferred (their COW stores stay busy)."""
    if not names:
        return []
    try:
        _run("dmsetup", "remove", "--retry", *names)
        return []
    except RuntimeError:
        pass
    deferred = []
    for name in names:
        if not Path(f"/dev/mapper/{name}").exists():
            continue
        try:
            _run("dmsetup", "remove", "--retry", name)
        except RuntimeError:
            _run("dmsetup", "remove", "--deferred", name)
            deferred.append(name)
            print(f"stonelab-crash: {name} still held after unmount, removal deferred "
                  f"({_holders('/dev/mapper')})", file=sys.stderr)
    return deferred


def _ram_disks() -> list[str]:
    """The guest's brd RAM disks nothing holds now (a COW store of no snapshot), loading ``brd`` with
    :data:`RAM_DISKS` disks of :data:`RAM_DISK_KIB` KiB first.  A disk a held snapshot still uses is left out:
    a second snapshot on the same COW device would be a snapshot *handover* to dm-snapshot, which refuses to
    resume it ("resume ioctl … Invalid argument")."""
    if not Path("/sys/module/brd").exists():
        _run("modprobe", "brd", f"rd_nr={RAM_DISKS}", f"rd_size={RAM_DISK_KIB}", "max_part=0")
    free = []
    for disk in sorted(Path("/sys/block").glob("ram*"), key=lambda p: int(p.name[3:])):
        if not any((disk / "holders").iterdir()):
            free.append(f"/dev/{disk.name}")
    return free


def _apply(device: str, job: Job, data, chunk_ids: list[int]) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for cid in chunk_ids:
            offset, start, length = job.chunks[cid]
            os.pwrite(fd, data[start:start + length], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(argv: list[str], parser) -> dict:
    """Run the stonelab CLI with ``argv`` in a forked child (imports and parser done); exit status, output."""
    from stonelab import cli
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:  # child
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                code = cli.main(argv, parser)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException as err:  # noqa: BLE001 — reported as the recovery's failure
                print(f"{type(err).__name__}: {err}", file=sys.stderr)
                code = 70
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -1
                break
            time.sleep(0.005)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    exit_code = os.waitstatus_to_exitcode(status) if status != -1 else -9
    return {"exit": exit_code, "output": text[-1500:]}


def _holders(path: str) -> str:
    """Processes with a file open below ``path`` (for the message when an unmount is refused)."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd).startswith(path):
                    found.append(f"{fd_dir.parent.name}:{os.readlink(fd)}")
        except OSError:
            continue
    return ", ".join(found[:5]) or "no process holds a file there"


@dataclass
class Phases:
    """Wall-clock seconds per phase of one state (what bounds the rate: see bench/crash.py)."""

    seconds: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.monotonic)

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self.last, 3)
        self.last = now


def check_state(job: Job, data, device: str, chunk_ids: list[int], parser, clock: Phases,
                mountpoint: str = MOUNTPOINT) -> dict:
    """Write one state's own chunks onto ``device`` (a fresh snapshot of the base), mount it at ``mountpoint``,
    recover, observe, unmount; the result as a JSON-ready dict.  Raises RuntimeError when the unmount is
    refused."""
    from lab.probe import observe
    result: dict = {"chunks": len(chunk_ids), "phases": clock.seconds}
    _apply(device, job, data, chunk_ids)
    clock.done("apply")
    os.makedirs(mountpoint, exist_ok=True)
    problem = _mount(device, mountpoint, job.fstype)
    clock.done("mount")
    if problem:
        result["mount_error"] = problem
        return result
    try:
        if job.system != "reference":
            result["system_state"] = _observe_system(job, mountpoint)
            clock.done("recovery")
            return result
        argv = [a.replace("{root}", mountpoint) for a in job.recovery]
        result["recovery"] = _recover(argv, parser)
        clock.done("recovery")
        try:
            result["observation"] = asdict(observe(Path(mountpoint)))
        except OSError as err:  # e.g. EBADMSG: a metadata checksum the journal replay did not make whole
            result["read_error"] = f"{err.strerror or err} ({str(err.filename or '').removeprefix(mountpoint)})"
        clock.done("observe")
    finally:
        problem = _unmount(mountpoint)
        clock.done("umount")
        if problem:
            raise RuntimeError(f"umount {mountpoint}: {problem} ({_holders(mountpoint)})")
    return result


def _observe_system(job: Job, mountpoint: str = MOUNTPOINT) -> dict:
    """A real system's own recovery, then its state and its own invariants on the mounted state
    (:func:`lab.systems.crashcheck.observe_system`; its HOME and caches in a fresh directory on the guest's
    tmpfs); ``{"error": ...}`` when they could not run."""
    from lab.systems.crashcheck import observe_system
    with tempfile.TemporaryDirectory(prefix=f"stonelab-sut-{job.system}-") as scratch:
        try:
            return observe_system(job.system, Path(mountpoint) / job.system_root, Path(scratch), recover=True)
        except Exception as err:  # noqa: BLE001 — the state is judged as not recovering, the job goes on
            return {"error": f"{type(err).__name__}: {err}"[-600:]}


def _failure(err: Exception) -> dict:
    first = err.__context__ if isinstance(err.__context__, RuntimeError) else err
    return {"error": f"{type(first).__name__}: {first}"[-600:]}


def _check_batch(job: Job, data, base: str, numbers: list[int], sectors: int, parser, workers: int) -> list[dict]:
    """The states ``numbers`` of ``job``: their snapshots created at once, each checked (``workers`` at a time),
    all removed at once.  The creation and removal seconds are shared out over the batch (phases ``snapshot``
    and ``remove``)."""
    started = time.monotonic()
    cows = _ram_disks()
    if len(cows) < len(numbers):
        raise RuntimeError(f"{len(cows)} free RAM disks for {len(numbers)} snapshots")
    names = {number: f"{TOP}-{os.getpid()}-{number}" for number in numbers}
    try:
        _create({names[n]: _snapshot_table(base, cow, sectors) for n, cow in zip(numbers, cows)})
    except RuntimeError as err:
        return [dict(_failure(err), state=n, seconds=0.0) for n in numbers]
    share = (time.monotonic() - started) / len(numbers)
    try:
        results = _in_workers(numbers, workers, lambda number, mountpoint: _one_state(
            job, data, f"/dev/mapper/{names[number]}", number, parser, share, mountpoint))
    finally:
        removing = time.monotonic()
        _remove(list(names.values()))
    share = round((time.monotonic() - removing) / len(numbers), 3)
    for result in results:
        result.setdefault("phases", {})["remove"] = share
        result["seconds"] = round(result["seconds"] + share, 3)
    return results


def _one_state(job: Job, data, device: str, number: int, parser, snapshot_share: float, mountpoint: str) -> dict:
    clock = Phases()
    clock.seconds["snapshot"] = round(snapshot_share, 3)
    try:
        result = check_state(job, data, device, job.states[number], parser, clock, mountpoint)
    except Exception as err:  # noqa: BLE001 — one state's failure is that state's result, not the job's
        result = _failure(err)
    return dict(result, state=number, seconds=round(sum(clock.seconds.values()), 3))


def _in_workers(numbers: list[int], workers: int, check) -> list[dict]:
    """``check(number, mountpoint)`` for every state of ``numbers``, spread over ``workers`` forked processes
    (one per guest vCPU, each with its own mount point: the states are independent file systems); the results
    in the order of ``numbers``.  One worker: in this process."""
    if workers <= 1 or len(numbers) == 1:
        return [check(number, MOUNTPOINT) for number in numbers]
    children = []
    for worker in range(min(workers, len(numbers))):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: its share of the batch, one JSON line per state on the pipe
            os.close(read_end)
            code = 0
            try:
                with os.fdopen(write_end, "w") as pipe:
                    for number in numbers[worker::workers]:
                        pipe.write(json.dumps(check(number, f"{MOUNTPOINT}-{worker}")) + "\n")
            except BaseException:  # noqa: BLE001 — the parent reports the states that never came
                code = 70
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, os.fdopen(read_end)))
    found = {}
    for pid, pipe in children:
        with pipe:
            for line in pipe:
                result = json.loads(line)
                found[result["state"]] = result
        os.waitpid(pid, 0)
    return [found.get(n, {"error": "the worker checking this state died", "state": n, "seconds": 0.0})
            for n in numbers]


def run_job(directory: Path, out=sys.stdout) -> int:
    """The guest side: every state of the job in ``directory``, one JSON line each on ``out``."""
    job = Job(**json.loads((directory / "job.json").read_text()))
    data = memoryview((directory / "data.bin").read_bytes())
    import lab.probe  # noqa: F401 — imported before the forks, so each recovery starts warm
    if job.system != "reference":
        import lab.systems.crashcheck  # noqa: F401 — once, not per state
    import stonelab.cli
    word = next((w for w in job.recovery if not w.startswith("-")), "")
    module = stonelab.cli.COMMAND_INDEX.get(word)
    parser = stonelab.cli.build_parser([module] if module else None)  # only the recovery's command: TCG time
    for name in PRELOAD:
        importlib.import_module(name)
    workers = max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    _run("modprobe", "dm-snapshot")
    sectors = _sectors(job.device)
    # names of their own (the pid): a device the kernel still holds (removed --deferred) never blocks the next job
    base_name = f"{BASE}-{os.getpid()}"
    _create({base_name: _snapshot_table(job.device, _ram_disks()[0], sectors)})
    try:
        base = f"/dev/mapper/{base_name}"
        _apply(base, job, data, job.common)
        for first in range(0, len(job.states), BATCH):
            numbers = list(range(first, min(first + BATCH, len(job.states))))
            for result in _check_batch(job, data, base, numbers, sectors, parser, workers):
                out.write(json.dumps(result) + "\n")
            out.flush()
    finally:
        _remove([base_name])
    return 0


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
