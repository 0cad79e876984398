"""The guest agent: started by the lab's init inside the guest, it serves the host over a virtio-serial port.

Requests and answers are JSON lines (see ``vm.protocol``). Its start is on every fresh boot's path to
agent-ready, and a TCG guest pays tenths of a second per module: it imports only ``os``, ``stat``, ``subprocess``,
``sys``, ``time`` and ``vm.protocol`` (no ``argparse``, ``pathlib``, ``typing`` or ``dataclasses``: bench/boot.py
measures the difference); xxhash and fcntl are imported by the requests that need them. The init starts it
with ``python -S``: ``site`` is loaded only by the request that needs site-packages (``hash_tree``).
Run it locally over stdin/stdout with ``python -m vm.agent --stdio`` (the protocol tests do).
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from vm.protocol import OPS, ChannelClosed, LineChannel, ProtocolError, b64, unb64


class WarmPython:
    """The agent's zygote (``vm.zygote``), imported and started on the first ``run`` request marked ``warm``."""

    def __init__(self):
        self.zygote = None

    def run(self, command: list[str], env: dict[str, str], cwd: str | None, timeout: float | None):
        """The ``run`` answer of ``command`` forked from the zygote, or None: run it fresh."""
        if self.zygote is None:
            from vm.zygote import Zygote
            self.zygote = Zygote(sys.executable)
        return self.zygote.run(command, env, cwd, timeout)


def _run(request: dict[str, object], warm: WarmPython | None = None) -> dict[str, object]:
    command = request["command"]
    started = time.monotonic()
    env = dict(os.environ, **request.get("env", {}))
    shell = isinstance(command, str)
    if warm is not None and request.get("warm") and not shell:
        result = warm.run(command, env, request.get("cwd"), request.get("timeout"))
        if result is not None:
            return result
    try:
        proc = subprocess.run(command, shell=shell, capture_output=True, timeout=request.get("timeout"),
                              cwd=request.get("cwd") or None, env=env, stdin=subprocess.DEVNULL,
                              executable="/bin/sh" if shell else None)
    except subprocess.TimeoutExpired as err:
        return {"exit_code": -9, "stdout": _text(err.stdout), "stderr": _text(err.stderr), "timed_out": True,
                "seconds": time.monotonic() - started}
    except OSError as err:
        name = command if shell else command[0]
        return {"exit_code": 127, "stdout": "", "stderr": f"{name}: {err.strerror}", "seconds": 0.0}
    return {"exit_code": proc.returncode, "stdout": _text(proc.stdout), "stderr": _text(proc.stderr),
            "seconds": time.monotonic() - started}


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


def _read_file(request: dict[str, object]) -> dict[str, object]:
    with open(request["path"], "rb") as handle:
        return {"data": b64(handle.read())}


def _write_file(request: dict[str, object]) -> dict[str, object]:
    path = request["path"]
    data = unb64(request["data"])
    with open(path, "wb") as out:
        out.write(data)
        if request.get("fsync"):
            out.flush()
            os.fsync(out.fileno())
    if "mode" in request:
        os.chmod(path, int(request["mode"]))
    return {"size": len(data)}


def _site_packages() -> None:
    """Make the interpreter's site directories (the venv's site-packages: xxhash) importable. The guest's init
    starts the agent with ``python -S`` to keep ``site`` off the path to agent-ready; without ``-S`` (tests over
    stdio) ``site`` is loaded already and this does nothing."""
    if "site" not in sys.modules:
        import site
        site.main()


def hash_tree(root: str) -> dict[str, str]:
    """Every entry below ``root`` by relative path: files as ``file:<xxh3-128>:<mode>``, symlinks as
    ``link:<target>``, directories as ``dir:<mode>``. Paths are not followed through symlinks."""
    from pathlib import Path

    _site_packages()
    import xxhash

    entries: dict[str, str] = {}
    base = Path(root)
    for directory, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(directory, name)
            rel = str(path.relative_to(base))
            st = path.lstat()
            mode = format(stat.S_IMODE(st.st_mode), "o")
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = f"link:{os.readlink(path)}"
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = f"dir:{mode}"
            elif stat.S_ISREG(st.st_mode):
                digest = xxhash.xxh3_128()
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
                entries[rel] = f"file:{digest.hexdigest()}:{mode}"
            else:
                entries[rel] = f"other:{stat.S_IFMT(st.st_mode)}:{mode}"
    return entries


BLKFLSBUF = 0x1261  # linux/fs.h: _IO(0x12, 97)
BLKRRPART = 0x125F  # linux/fs.h: _IO(0x12, 95)


def rescan_disks(sys_block: str = "/sys/block", dev: str = "/dev", cmdline: str = "/proc/cmdline") -> list[str]:
    """Flush the cached blocks of every virtio disk but the userland image and re-read its partition table. A
    guest restored from a saved state sees new disk files behind the same devices (the system disk, and a
    recording target's read-only base image); without this it would trust its stale cache. The userland image
    (``stonelab.userland=vdX`` on the kernel command line) is mounted and the same file before and after: its
    page cache is what makes a restored guest fast. OSError (EBUSY) when a partition of a rescanned disk is
    mounted."""
    import fcntl

    with open(cmdline) as handle:
        userland = next((w.split("=", 1)[1] for w in handle.read().split() if w.startswith("stonelab.userland=")),
                        None)
    done = []
    for name in sorted(n for n in os.listdir(sys_block) if n.startswith("vd")):
        if name == userland:
            continue
        fd = os.open(os.path.join(dev, name), os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
            fcntl.ioctl(fd, BLKRRPART)
        finally:
            os.close(fd)
        done.append(name)
    return done


def handle(request: dict[str, object], warm: WarmPython | None = None) -> dict[str, object]:
    """The answer to one request; a ``run`` marked ``warm`` (a Python command) goes through ``warm``'s zygote
    when it can serve it exactly as a fresh process."""
    op = request.get("op")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} (valid: {', '.join(OPS)})")
    if op == "ping":
        return {"pong": True, "pid": os.getpid()}
    if op == "run":
        return _run(request, warm)
    if op == "read_file":
        return _read_file(request)
    if op == "write_file":
        return _write_file(request)
    if op == "hash_tree":
        return {"entries": hash_tree(request["path"])}
    if op == "rescan_disks":
        return {"disks": rescan_disks()}
    os.sync()
    return {"shutdown": True}


def serve(channel: LineChannel, warm: WarmPython | None = None) -> str:
    """Answer requests until a shutdown request ("shutdown") or the end of the stream ("closed": the host side
    went away — e.g. the guest was saved and is being restored; the caller serves again when it comes back)."""
    uptime = None
    try:
        with open("/proc/uptime") as proc_uptime:
            uptime = float(proc_uptime.read().split()[0])
    except (OSError, ValueError):
        pass
    warm = warm or WarmPython()
    try:
        channel.send({"event": "ready", "pid": os.getpid(), "uptime": uptime})
        while True:
            try:
                request = channel.receive(None)
            except ChannelClosed:
                return "closed"
            except ProtocolError as err:
                channel.send({"id": None, "ok": False, "error": str(err)})
                continue
            ident = request.get("id")
            try:
                answer = {"id": ident, "ok": True, "result": handle(request, warm)}
            except Exception as err:  # noqa: BLE001 - every failure goes back to the host as one line
                answer = {"id": ident, "ok": False, "error": f"{type(err).__name__}: {err}"}
            channel.send(answer)
            if request.get("op") == "shutdown":
                return "shutdown"
    except (BrokenPipeError, ConnectionResetError):
        return "closed"


USAGE = "usage: python -m vm.agent (--port DEVICE | --stdio)"


def main(argv: list[str] | None = None) -> int:
    """``--port DEVICE``: serve on that virtio-serial port (in the guest); ``--stdio``: over stdin/stdout (tests).
    The two options are read by hand: argparse alone costs a TCG guest's boot ~0.5 s."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--stdio"]:
        serve(LineChannel(sys.stdin.fileno(), sys.stdout.fileno()))
        return 0
    if len(args) != 2 or args[0] != "--port":
        print(USAGE, file=sys.stderr)
        return 2
    fd = os.open(args[1], os.O_RDWR | os.O_NOCTTY)
    warm = WarmPython()  # one zygote for the agent's life, also across a save and restore of the guest
    # A virtio-serial port reads end-of-file while the host side is not connected: wait for it to come back.
    while serve(LineChannel(fd, fd), warm) == "closed":
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
