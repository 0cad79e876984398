"""Boot benchmark (issue 5, item 11): one command, same kernel, same run, figures and ratios.

  .venv/bin/python bench/boot.py [--kernel K] [--accel auto|kvm|tcg] [--runs N] [--no-virtme]

Measures (wall clock of the whole QEMU process, best of N):
  bare       busybox initramfs whose init only powers off (baseline a): to its marker, to QEMU exit
  agent      the lab's guest: modules, host root over 9p, Python agent: to agent-ready, to power-off
  virtme-ng  `vng --run KERNEL --exec true` (baseline b; --disable-kvm under TCG), from PyPI in a private venv
  restore    a guest restored from a saved VM state (QEMU -incoming from a migration file) to a console answer,
             against a fresh boot of the same guest
Targets: agent-ready ≤ 1.5 × bare, agent-ready < 0.4 × virtme-ng.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vm.accel import AccelSelector  # noqa: E402
from vm.host import default_kernel, kernel_from_path  # noqa: E402
from vm.initramfs import BARE_MARKER, build_initramfs, cache_dir  # noqa: E402
from vm.machine import Machine, agent_config  # noqa: E402
from vm.qemu import MachineConfig  # noqa: E402
from vm.transport import ConsoleTransport  # noqa: E402


def bare(kernel, accel) -> tuple[float, float]:
    config = MachineConfig(accel=accel, kernel=kernel, initrd=build_initramfs(kernel, "bare").path,
                           append="console=ttyS0 quiet panic=-1", share_host_root=False, agent=False)
    started = time.monotonic()
    with Machine(config, name="bench-bare", transport=ConsoleTransport()) as guest:
        guest.wait_for_console(BARE_MARKER, 120)
        marker = time.monotonic() - started
        guest.wait_for_exit(120)
    return marker, time.monotonic() - started


def agent(kernel, accel) -> tuple[float, float]:
    started = time.monotonic()
    with Machine(agent_config(kernel, accel), name="bench-agent") as guest:
        ready = time.monotonic() - started
        guest.succeed("true")
        guest.shutdown()
    return ready, time.monotonic() - started


def console_guest(kernel, accel, extra: list[str] | None = None) -> MachineConfig:
    config = agent_config(kernel, accel, mode="initramfs-shell", memory_mb=256)
    config.share_host_root = False
    config.agent = False
    config.extra_args = list(extra or [])
    return config


def fresh_console(kernel, accel) -> float:
    started = time.monotonic()
    with Machine(console_guest(kernel, accel), name="bench-fresh", transport=ConsoleTransport()) as guest:
        guest.wait_for_console("STONELAB-INITRAMFS-SHELL", 120)
        assert ConsoleTransport(guest.console.send, guest.console.wait_for).run("echo up", 120).exit_code == 0
        return time.monotonic() - started


def save_state(kernel, accel, state: Path) -> float:
    with Machine(console_guest(kernel, accel), name="bench-save", transport=ConsoleTransport()) as guest:
        guest.wait_for_console("STONELAB-INITRAMFS-SHELL", 120)
        ConsoleTransport(guest.console.send, guest.console.wait_for).run("echo ready", 120)
        qmp = guest.qmp()
        started = time.monotonic()
        qmp.execute("migrate", {"uri": f"exec:cat > {state}"})
        while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed"):
            time.sleep(0.05)
        if status != "completed":
            raise SystemExit(f"saving the VM state failed: {qmp.execute('query-migrate')}")
        return time.monotonic() - started


def restore(kernel, accel, state: Path) -> float:
    config = console_guest(kernel, accel, ["-incoming", f"exec:cat {state}"])
    started = time.monotonic()
    with Machine(config, name="bench-restore", transport=ConsoleTransport()) as guest:
        qmp = guest.qmp()
        while qmp.status() != "running":  # console input before the state is loaded would be lost
            time.sleep(0.02)
        ConsoleTransport(guest.console.send, guest.console.wait_for).run("echo restored", 120)
        return time.monotonic() - started


def virtme(kernel, accel) -> tuple[float | None, str]:
    """Time of `vng --run KERNEL --exec true`, or None and exactly why it could not be measured."""
    vng = shutil.which("vng")
    venv = cache_dir() / "virtme-ng-venv"
    if vng is None:
        vng_path = venv / "bin" / "vng"
        if not vng_path.exists():
            print(f"installing virtme-ng from PyPI into {venv} (baseline only, not a project dependency)")
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
            pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "virtme-ng"], capture_output=True,
                                 text=True) if made.returncode == 0 else made
            if pip.returncode != 0:
                return None, f"virtme-ng could not be installed: {(pip.stderr or pip.stdout).strip()[-300:]}"
        vng = str(vng_path)
    argv = [vng, "--run", str(kernel.image), "--exec", "true"]
    if accel.accel != "kvm":
        argv.append("--disable-kvm")
    env = {**os.environ, "PATH": f"{Path(vng).parent}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(argv)}` did not finish within 300 s"
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        return None, f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return seconds, " ".join(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-virtme", action="store_true")
    args = parser.parse_args()
    kernel = kernel_from_path(args.kernel) if args.kernel else default_kernel()
    accel = AccelSelector().choose(kernel, args.accel)
    print(f"kernel {kernel.image}; {accel.describe()}")
    build_initramfs(kernel, "agent"), build_initramfs(kernel, "bare")  # cache warm: boot times only

    bare_runs = [bare(kernel, accel) for _ in range(args.runs)]
    agent_runs = [agent(kernel, accel) for _ in range(args.runs)]
    bare_marker, bare_exit = min(r[0] for r in bare_runs), min(r[1] for r in bare_runs)
    agent_ready, agent_off = min(r[0] for r in agent_runs), min(r[1] for r in agent_runs)
    print(f"bare initramfs   : marker {bare_marker:6.2f} s   power-off {bare_exit:6.2f} s")
    print(f"lab agent guest  : ready  {agent_ready:6.2f} s   power-off {agent_off:6.2f} s")
    ratio = agent_ready / bare_exit
    print(f"agent-ready / bare boot (to power-off) = {ratio:.2f}  (target ≤ 1.5: {'met' if ratio <= 1.5 else 'NOT met'})")

    with tempfile.TemporaryDirectory(prefix="stonelab-bench-") as tmp:
        state = Path(tmp) / "vm.state"
        fresh = min(fresh_console(kernel, accel) for _ in range(args.runs))
        save = save_state(kernel, accel, state)
        restored = min(restore(kernel, accel, state) for _ in range(args.runs))
        print(f"busybox console guest: fresh boot to answer {fresh:6.2f} s; save {save:.2f} s "
              f"({state.stat().st_size >> 20} MiB); restore to answer {restored:6.2f} s "
              f"(restore/fresh = {restored / fresh:.2f})")
    print("  (agent guests cannot be restored: QEMU refuses to migrate a guest with a mounted 9p export)")

    if args.no_virtme:
        print("virtme-ng        : skipped (--no-virtme)")
    else:
        seconds, how = virtme(kernel, accel)
        if seconds is None:
            print(f"virtme-ng        : not measured — {how}")
        else:
            ratio = agent_ready / seconds
            print(f"virtme-ng        : {seconds:6.2f} s   ({how})")
            print(f"agent-ready / virtme-ng = {ratio:.2f}  (target < 0.4: {'met' if ratio < 0.4 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
