"""Materialise crash states in the guest: device-mapper snapshots of the pre-recording image, no disk copies.

The host writes a *job* (``write_job``): ``job.json`` (the states, each a list of chunks) and ``data.bin`` (each
chunk's bytes once).  A chunk is a byte range of the root partition.  In the guest, which sees the untouched
pre-recording image read-only as a second disk, ``python -m lab.crash.materialize JOB_DIR`` (``run_job``):

1. loads ``dm-snapshot`` and ``loop`` and makes two copy-on-write stores (sparse files on the guest's tmpfs,
   attached to loop devices);
2. ``stonelab-crash-base`` = a non-persistent dm snapshot of the pristine partition; the writes every state shares
   (the log before the earliest flush boundary) are written into it once;
3. for each state: ``stonelab-crash-state`` = a snapshot of the base with a COW store of its own; its own writes;
   ``mount -t ext4`` (or ext2: the job's ``fstype``; the guest kernel replays an ext4 journal); the system under
   test's recovery and observation — for the reference its recovery verb (forked from this process, which has
   imported it already) and ``lab.probe.observe``; for a real system (``system: nix|ostree``)
   ``lab.systems.crashcheck.observe_system`` on ``system_root`` below the mount, whose commands are that
   system's next command, i.e. its recovery, and its own integrity check; unmount; remove the snapshot.  One
   JSON line per state on stdout.

Every device, mount and loop device is removed on the way out, also when a state fails; they live only in the
guest, which the lab powers off afterwards in any case.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

MOUNTPOINT = "/mnt/stonelab-crash"
BASE, TOP = "stonelab-crash-base", "stonelab-crash-state"  # + the job's pid (and the state's number)
COW_BYTES = 1 << 30  # sparse: only the chunks a snapshot really changes take memory
RECOVERY_TIMEOUT = 120.0


@dataclass
class Job:
    """What the guest needs: the pristine partition, chunks (partition offset, data offset, length), the chunk
    ids every state shares, and per state its own chunk ids; the recovery command (stonelab CLI arguments,
    ``{root}`` replaced by the mount point; the reference only); the system under test (``reference``, ``nix``,
    ``ostree``), a real system's root relative to the mounted file system, and the file system type."""

    device: str
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    common: list[int] = field(default_factory=list)
    states: list[list[int]] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)
    system: str = "reference"
    system_root: str = ""
    fstype: str = "ext4"


def write_job(directory: Path, job: Job, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data.bin").write_bytes(data)
    (directory / "job.json").write_text(json.dumps(asdict(job)))
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


def _snapshot(stack: ExitStack, name: str, origin: str, cow: str, sectors: int) -> str:
    _run("dmsetup", "create", name, "--table", f"0 {sectors} snapshot {origin} {cow} N 8")
    stack.callback(_remove, name)
    return f"/dev/mapper/{name}"


def _remove(name: str) -> None:
    """Remove a dm device; one the kernel still holds for a moment is removed as soon as it is released
    (``--deferred``) — it lives in the guest only, which the lab powers off in any case."""
    for _ in range(4):
        try:
            _run("dmsetup", "remove", "--retry", name)
            return
        except RuntimeError:
            time.sleep(1.0)
    _run("dmsetup", "remove", "--deferred", name)
    print(f"stonelab-crash: {name} still held after unmount, removal deferred ({_holders('/dev/mapper')})",
          file=sys.stderr)


def _cow_device(stack: ExitStack, scratch: Path, name: str) -> str:
    """A sparse file on the guest's tmpfs behind a loop device, both gone when ``stack`` closes.  Every snapshot
    gets its own: two snapshots sharing a COW device are a snapshot *handover* to dm-snapshot, which refuses to
    resume the second while the first exists ("resume ioctl … Invalid argument")."""
    path = scratch / name
    with open(path, "wb") as handle:
        handle.truncate(COW_BYTES)
    stack.callback(path.unlink, missing_ok=True)
    loop = _run("losetup", "--find", "--show", str(path))
    stack.callback(_run, "losetup", "--detach", loop)
    return loop


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


def _observe_system(job: Job, scratch: Path) -> dict:
    """A real system's own recovery, then its state and its own invariants on the mounted state
    (:func:`lab.systems.crashcheck.observe_system`); ``{"error": ...}`` when they could not run."""
    from lab.systems.crashcheck import observe_system
    try:
        return observe_system(job.system, Path(MOUNTPOINT) / job.system_root, scratch / f"sut-{job.system}",
                              recover=True)
    except Exception as err:  # noqa: BLE001 — the state is judged as not recovering, the job goes on
        return {"error": f"{type(err).__name__}: {err}"[-600:]}


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


def check_state(job: Job, data, base: str, scratch: Path, chunk_ids: list[int], sectors: int, parser,
                name: str = TOP) -> dict:
    """Build one state over ``base``, mount it, recover, observe; the result as a JSON-ready dict."""
    from lab.probe import observe
    result: dict = {"chunks": len(chunk_ids)}
    clock = Phases()
    result["phases"] = clock.seconds
    with ExitStack() as stack:
        device = _snapshot(stack, name, base, _cow_device(stack, scratch, f"{name}.cow"), sectors)
        clock.done("snapshot")
        _apply(device, job, data, chunk_ids)
        clock.done("apply")
        os.makedirs(MOUNTPOINT, exist_ok=True)
        problem = _mount(device, MOUNTPOINT, job.fstype)
        clock.done("mount")
        if problem:
            result["mount_error"] = problem
            return result
        try:
            if job.system != "reference":
                result["system_state"] = _observe_system(job, scratch)
                clock.done("recovery")
            else:
                argv = [a.replace("{root}", MOUNTPOINT) for a in job.recovery]
                result["recovery"] = _recover(argv, parser)
                clock.done("recovery")
                result["observation"] = asdict(observe(Path(MOUNTPOINT)))
                clock.done("observe")
        finally:
            problem = _unmount(MOUNTPOINT)
            clock.done("umount")
            if problem:
                raise RuntimeError(f"umount {MOUNTPOINT}: {problem} ({_holders(MOUNTPOINT)})")
    return result


def run_job(directory: Path, out=sys.stdout) -> int:
    """The guest side: every state of the job in ``directory``, one JSON line each on ``out``."""
    job = Job(**json.loads((directory / "job.json").read_text()))
    data = memoryview((directory / "data.bin").read_bytes())
    import lab.probe  # noqa: F401 — imported before the forks, so each recovery starts warm
    if job.system != "reference":
        import lab.systems.crashcheck  # noqa: F401 — once, not per state
    import stonelab.cli
    parser = stonelab.cli.build_parser()
    _run("modprobe", "dm-snapshot")
    _run("modprobe", "loop")
    with tempfile.TemporaryDirectory(prefix="stonelab-cow-") as scratch, ExitStack() as stack:
        sectors = _sectors(job.device)
        # names of their own: a device the kernel still holds (removed --deferred) never blocks the next one
        base = _snapshot(stack, f"{BASE}-{os.getpid()}", job.device, _cow_device(stack, Path(scratch), "base.cow"),
                         sectors)
        _apply(base, job, data, job.common)
        for number, chunk_ids in enumerate(job.states):
            started = time.monotonic()
            try:
                result = check_state(job, data, base, Path(scratch), chunk_ids, sectors, parser,
                                     f"{TOP}-{os.getpid()}-{number}")
            except RuntimeError as err:
                first = err.__context__ if isinstance(err.__context__, RuntimeError) else err
                result = {"error": str(first)[-600:]}
            result.update(state=number, seconds=round(time.monotonic() - started, 3))
            out.write(json.dumps(result) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
