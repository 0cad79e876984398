"""What Nix 2.8 and OSTree 2022.7 ask of a kernel: their generation operations traced in the Linux guest.

The same method as :mod:`lab.kernel.trace`, applied to the real systems under test (:mod:`lab.systems`): one guest
(the SUT root on ext4, the host's ``nix-bin``/``ostree`` over 9p as in every real-system run), each system on a
root of its own, every command of an operation run under ``strace -f --seccomp-bpf`` with the same call set and
reduced to the same feature keys.  Phases are ``<system>:<operation>`` — ``install``, ``upgrade``, ``rollback``,
``switch`` (Nix), ``remove``, ``gc``, ``verify`` — so ``stonelab compat report`` can say which of a kernel's gaps
hit Nix or OSTree.  The result, ``compat/requirements-systems.json``, has the format of
``compat/requirements.json`` (keys, phases, errno names; no paths, store hashes or counts).
"""
from __future__ import annotations

import itertools
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.kernel.trace import TRACED_CALLS, Feature, Trace, parse_strace
from lab.packages import PackageDecl
from lab.target import CommandResult
from stonelab.errors import StonelabError

SYSTEMS_TRACED_ON = "Linux guest (QEMU), root ext4; Nix 2.8 (nix-bin) and OSTree 2022.7 (ostree) from Debian"
GUEST_LOGS = "/tmp/stonelab-systems-trace"
BASE = PackageDecl(key="base", name="base", version="1", files={"lib/libbase.so.1": "ELF base\n"})
HELLO_1 = PackageDecl(key="hello-1", name="hello", version="1",
                      files={"bin/hello": "#!/bin/sh\necho one\n", "share/hello/empty": ""}, symlinks={"bin/hi": "hello"})
HELLO_2 = PackageDecl(key="hello-2", name="hello", version="2", files={"bin/hello": "#!/bin/sh\necho two\n"},
                      symlinks={"bin/hi": "hello"})


class TracingRunner:
    """A :class:`~lab.systems.base.CommandRunner` around ``inner`` (a guest runner): while ``phase`` is set,
    every argv runs under strace in the guest and its calls are added to ``features`` under that phase."""

    def __init__(self, inner, machine, features: dict[str, Feature]):
        self.inner = inner
        self.machine = machine
        self.features = features
        self.phase: str | None = None
        self._logs = itertools.count(1)

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> CommandResult:
        if self.phase is None:
            return self.inner(argv, env=env, cwd=cwd)
        log = f"{GUEST_LOGS}/{next(self._logs)}.strace"
        traced = ["strace", "-f", "-qq", "-s", "256", "--seccomp-bpf", f"--trace={TRACED_CALLS}", "-o", log,
                  *argv]
        result = self.inner(traced, env=env, cwd=cwd)
        parse_strace(self.machine.read_file(log).decode(errors="replace"), self.phase, self.features)
        self.machine.succeed(["rm", "-f", log])
        result.argv = list(argv)
        return result


def operations(name: str) -> list[tuple[str, object]]:
    """``(operation, call)`` in the order traced; each call takes the system and returns a CommandResult."""
    ops: list[tuple[str, object]] = [
        ("install", lambda s: s.install([BASE, HELLO_1], [BASE, HELLO_1])),
        ("upgrade", lambda s: s.install([HELLO_2], [BASE, HELLO_2])),
        ("rollback", lambda s: s.rollback()),
    ]
    if name == "nix":
        ops.append(("switch", lambda s: s.switch(2)))
    ops += [
        ("remove", lambda s: s.remove(["hello"], [BASE])),
        ("gc", lambda s: s.gc(1)),
        ("verify", lambda s: s.verify()),
    ]
    return ops


def trace_systems_in_guest(names: Sequence[str] = ("nix", "ostree"), accel: str = "auto",
                           workdir: Path | None = None) -> Trace:
    """Boot one real-system guest (ext4 root, host root over 9p) and trace every operation of each system in
    ``names`` there.  Raises StonelabError (one line) when a binary is missing or an operation fails."""
    from lab.runner import run_cache_dir
    from lab.systems import SYSTEMS, SystemName
    from lab.systems.guest import SystemGuest, guest_system
    from vm.host import require_program

    for name in names:
        require_program("nix-env" if name == "nix" else name, SYSTEMS[SystemName(name)][1])
    require_program("strace", "strace")
    features: dict[str, Feature] = {}
    phases: list[str] = []
    with tempfile.TemporaryDirectory(dir=workdir or run_cache_dir(), prefix="trace-systems-") as tmp, \
            SystemGuest(Path(tmp) / "vm", record=False, accel=accel) as guest:
        guest.machine.succeed(["mkdir", "-p", GUEST_LOGS])
        for name in names:
            system = guest_system(name, guest, Path(tmp) / name)
            runner = TracingRunner(system.inner.run, guest.machine, features)
            system.inner.run = runner
            system.prepare()
            for operation, call in operations(name):
                runner.phase = f"{name}:{operation}"
                result = call(system)
                runner.phase = None
                if not result.ok:
                    raise StonelabError(f"{name} {operation} failed in the guest ({shlex.join(result.argv)[:200]}): "
                                        f"{result.summary()[-300:]}")
                phases.append(f"{name}:{operation}")
        guest.machine.shutdown()
    return Trace.collect(features, phases, SYSTEMS_TRACED_ON)
