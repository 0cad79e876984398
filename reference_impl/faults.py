"""Named fault points at the step boundaries of a transaction.

``STONELAB_FAULT=<point>:<action>`` makes the process stop at that point:

- ``crash``: SIGKILL itself (no atexit, no flush — what a power cut does to the process);
- ``pause``: print ``STONELAB-FAULT <point>`` to stderr and to the virtio-serial port
  ``/dev/virtio-ports/stonelab`` when it exists, then wait to be killed (the lab host cuts the power there);
- ``eio``: fail that step with ``OSError(EIO)``.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from stonelab.errors import StonelabError

ENV_VAR = "STONELAB_FAULT"
MARKER_PORT = "/dev/virtio-ports/stonelab"
MARKER = "STONELAB-FAULT"

# Ordered as a transaction passes them.
FAULT_POINTS: tuple[str, ...] = (
    "blit.begin",      # staging prepared, nothing linked yet
    "blit.mid",        # half of the new tree linked into staging
    "blit.end",        # new tree linked into staging, no state row yet
    "state.recorded",  # state row committed; .stateID, os-release and triggers not done
    "swap.before",     # staged tree and intent record durable, /usr not switched yet
    "swap.after",      # /usr switched, old tree still in staging
    "archive.after",   # old tree archived under .moss/root/<old>
    "boot.before",     # filesystem transaction complete, boot entries not synchronised yet
    "boot.mid",        # kernels copied to the ESP, entries not written yet
    "commit.after",    # everything done, intent record removed
)
FAULT_DESCRIPTIONS = dict(zip(FAULT_POINTS, (
    "staging prepared, nothing linked yet",
    "half of the new tree linked into staging",
    "new tree linked into staging, no state row yet",
    "state row committed; .stateID, os-release and triggers not done",
    "staged tree and intent record durable, /usr not yet switched",
    "/usr switched, old tree still in staging",
    "old tree archived under .moss/root/<old>",
    "filesystem transaction complete, boot entries not yet synchronised",
    "kernels copied to the ESP, entries not yet written",
    "transaction complete, intent record removed",
)))
ACTIONS = ("crash", "pause", "eio")


@dataclass(frozen=True)
class FaultSpec:
    point: str
    action: str

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        point, sep, action = text.strip().partition(":")
        action = action or "crash"
        if point not in FAULT_POINTS:
            raise StonelabError(f"{ENV_VAR}={text}: unknown fault point {point!r} "
                                f"(valid: {', '.join(FAULT_POINTS)})")
        if action not in ACTIONS:
            raise StonelabError(f"{ENV_VAR}={text}: unknown action {action!r} (valid: {', '.join(ACTIONS)})")
        return cls(point, action)


def configured_fault(environ: Mapping[str, str] | None = None) -> FaultSpec | None:
    """The fault requested through the environment, validated (raises StonelabError when malformed)."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return FaultSpec.parse(text) if text.strip() else None


def fault_point(name: str, environ: Mapping[str, str] | None = None) -> None:
    """Pass the fault point ``name``; stop here if the environment asks for it."""
    if name not in FAULT_POINTS:
        raise ValueError(f"fault point {name!r} is not declared in FAULT_POINTS")
    spec = configured_fault(environ)
    if spec is None or spec.point != name:
        return
    if spec.action == "eio":
        raise OSError(errno.EIO, f"injected EIO at fault point {name}")
    if spec.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    _announce(name)
    while True:  # pause: the lab kills us (or cuts the power) now
        time.sleep(3600)


def _announce(name: str) -> None:
    line = f"{MARKER} {name}\n"
    sys.stderr.write(line)
    sys.stderr.flush()
    if os.path.exists(MARKER_PORT):
        fd = os.open(MARKER_PORT, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


CUT_ENV_VAR = "STONELAB_CUT"
# Audit events (https://docs.python.org/3/library/audit_events.html) of calls that change a filesystem.
MUTATING_EVENTS = frozenset({"os.rename", "os.link", "os.symlink", "os.remove", "os.rmdir", "os.mkdir",
                             "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.copyfile",
                             "ctypes.call_function"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _mutates(event: str, args: tuple) -> bool:
    if event in MUTATING_EVENTS:
        return True
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags and flags & _WRITE_FLAGS)
    return False


def install_cut(environ: Mapping[str, str] | None = None) -> None:
    """``STONELAB_CUT=N[:pause]``: stop the process right after its N-th call that changes a filesystem (a power
    cut at a moment that is not a fault point); ``count:FILE`` writes the number of such calls to FILE at exit
    (the calibration run). Uses a Python audit hook (PEP 578), so no code path needs to cooperate."""
    text = (os.environ if environ is None else environ).get(CUT_ENV_VAR, "").strip()
    if not text:
        return
    seen = [0]
    if text.startswith("count:"):
        import atexit
        out = text.removeprefix("count:")
        atexit.register(lambda: open(out, "w").write(str(seen[0])))

        def count(event: str, args: tuple) -> None:
            if _mutates(event, args):
                seen[0] += 1
        sys.addaudithook(count)
        return
    moment, _sep, action = text.partition(":")
    if not moment.isdigit() or int(moment) < 1 or action not in ("", "crash", "pause"):
        raise StonelabError(f"{CUT_ENV_VAR}={text}: expected N[:crash|pause] (N >= 1) or count:FILE")
    limit = int(moment)

    def cut(event: str, args: tuple) -> None:
        # the hook runs before the call: stop before the (N+1)-th, so exactly N calls happened
        if _mutates(event, args):
            if seen[0] == limit:
                if action == "pause":
                    _announce("cut")
                    while True:
                        time.sleep(3600)
                os.kill(os.getpid(), signal.SIGKILL)
            seen[0] += 1
    sys.addaudithook(cut)
