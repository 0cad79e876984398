"""Boot benchmark: one command, same kernel, same run, figures and ratios against baselines measured alongside.

  .venv/bin/python bench/boot.py [--kernel K] [--accel auto|kvm|tcg] [--runs N] [--vng PATH]

Measures (wall clock, best of N; the machine may be shared, so the spread is printed too):
  bare        busybox initramfs whose init only powers off (baseline a): to QEMU exit
  agent       the lab's guest on the EROFS userland image: to agent-ready (fresh boot)
  agent-9p    the same guest with the host root over 9p (the previous design): to agent-ready
  restore     the agent guest restored from its saved state (vm.snapshot) to agent-ready, and to resumed
              (disks rescanned, clock set)
  no-op verb  `stonelab faults` in the guest: on the EROFS image restored (lazy command dispatch, warm page cache)
              against a fresh 9p guest importing every command module (how each guest command started before)
  virtme-ng   `vng --run KERNEL --exec true` (baseline b; --disable-kvm under TCG). Installed by `make bench` into
              .bench-venv from PyPI — never downloaded here; without it that line says how to get it.
Targets: agent-ready ≤ 1.3 × bare, ≤ 0.35 × virtme-ng; restore to agent-ready ≤ 1.5 s; no-op verb ≤ 0.5 × before.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vm.accel import AccelSelector  # noqa: E402
from vm.host import default_kernel, kernel_from_path  # noqa: E402
from vm.initramfs import BARE_MARKER, build_initramfs  # noqa: E402
from vm.machine import Machine, agent_config  # noqa: E402
from vm.qemu import DiskSpec, MachineConfig  # noqa: E402
from vm.snapshot import resume, saved_state  # noqa: E402
from vm.transport import ConsoleTransport  # noqa: E402
from vm.userland import build_userland  # noqa: E402


def bare(kernel, accel) -> float:
    config = MachineConfig(accel=accel, kernel=kernel, initrd=build_initramfs(kernel, "bare").path,
                           append="console=ttyS0 quiet panic=-1 no_timer_check", share_host_root=False, agent=False)
    started = time.monotonic()
    with Machine(config, name="bench-bare", transport=ConsoleTransport()) as guest:
        guest.wait_for_console(BARE_MARKER, 300)
        guest.wait_for_exit(300)
    return time.monotonic() - started


def blank_disk(directory: Path) -> DiskSpec:
    path = directory / "sut.img"
    with open(path, "wb") as handle:
        handle.truncate(322 << 20)  # the VM target's disk size: 64 MiB ESP + 256 MiB root + GPT
    return DiskSpec(path)


def agent_ready(config) -> float:
    started = time.monotonic()
    with Machine(config, name="bench-agent") as guest:
        ready = time.monotonic() - started
        guest.shutdown()
    return ready


def restored(config, state: Path) -> tuple[float, float]:
    started = time.monotonic()
    with Machine(config, name="bench-restore", restore_from=state) as guest:
        ready = time.monotonic() - started
        resume(guest)
        return ready, time.monotonic() - started


NOOP = ["-m", "stonelab.cli", "faults"]
NOOP_EAGER = ["-c", "import sys; from stonelab.cli import build_parser, main; build_parser(); main(['faults'])"]


def noop_seconds(guest, argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        guest.succeed([sys.executable, *argv], timeout=600)
        times.append(time.monotonic() - started)
    return min(times)


def virtme(kernel, accel, vng: str | None) -> tuple[float | None, str]:
    """Time of `vng --run KERNEL --exec true`, or None and exactly why it could not be measured."""
    vng = vng or shutil.which("vng") or str(ROOT / ".bench-venv" / "bin" / "vng")
    if not Path(vng).exists():
        return None, f"{vng} not found: `make bench` installs virtme-ng from PyPI into .bench-venv"
    argv = [vng, "--run", str(kernel.image), "--exec", "true"]
    if accel.accel != "kvm":
        argv.append("--disable-kvm")
    env = {**os.environ, "PATH": f"{Path(vng).parent}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(argv)}` did not finish within 600 s"
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        return None, f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return seconds, " ".join(argv)


def verdict(ratio: float, target: float) -> str:
    return f"target ≤ {target:g}: {'met' if ratio <= target else 'NOT met'}"


def spread(values: list[float]) -> str:
    return f"best {min(values):6.2f} s, median {statistics.median(values):6.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--vng", help="the virtme-ng `vng` to compare with (default: PATH, then .bench-venv)")
    args = parser.parse_args()
    kernel = kernel_from_path(args.kernel) if args.kernel else default_kernel()
    accel = AccelSelector().choose(kernel, args.accel)
    print(f"kernel {kernel.image}; {accel.describe()}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (a shared machine makes every figure noisy: compare ratios from one run)")
    build_initramfs(kernel, "agent"), build_initramfs(kernel, "bare")
    started = time.monotonic()
    image = build_userland()
    print(f"userland image   : {image.size >> 20} MiB, {'cached' if image.cached else 'built'} "
          f"in {time.monotonic() - started:.2f} s")

    with tempfile.TemporaryDirectory(prefix="stonelab-bench-") as tmp:
        disk = blank_disk(Path(tmp))
        image_config = agent_config(kernel, accel, [disk])
        nine_p_config = agent_config(kernel, accel, [disk], userland="9p")
        bare_runs, agent_runs, ninep_runs = [], [], []
        for _ in range(args.runs):  # interleaved, so that a load change hits every kind alike
            bare_runs.append(bare(kernel, accel))
            agent_runs.append(agent_ready(image_config))
            ninep_runs.append(agent_ready(nine_p_config))
        print(f"bare initramfs   : power-off {spread(bare_runs)}")
        print(f"agent (EROFS)    : ready     {spread(agent_runs)}")
        print(f"agent (9p, old)  : ready     {spread(ninep_runs)}")
        ratio = min(agent_runs) / min(bare_runs)
        print(f"agent-ready / bare boot = {ratio:.2f}  ({verdict(ratio, 1.3)}); 9p guest was "
              f"{min(ninep_runs) / min(bare_runs):.2f}")

        started = time.monotonic()
        state = saved_state(image_config)
        print(f"saved state      : {state.stat().st_size >> 20} MiB (made or found in {time.monotonic() - started:.1f} s)")
        restore_runs = [restored(image_config, state) for _ in range(args.runs)]
        best_ready = min(r[0] for r in restore_runs)
        print(f"restore          : to agent-ready {spread([r[0] for r in restore_runs])}; "
              f"to resumed {spread([r[1] for r in restore_runs])}")
        print(f"restore to agent-ready = {best_ready:.2f} s  ({verdict(best_ready, 1.5)})")

        with Machine(image_config, name="bench-noop", restore_from=state) as guest:
            resume(guest)
            new = noop_seconds(guest, NOOP, args.runs + 1)
        with Machine(nine_p_config, name="bench-noop-9p") as guest:
            old = noop_seconds(guest, NOOP_EAGER, args.runs + 1)
        print(f"no-op verb       : `stonelab faults` {new:.2f} s (EROFS, restored, lazy) against {old:.2f} s "
              f"(9p, every command module) = {new / old:.2f}  ({verdict(new / old, 0.5)})")

    seconds, how = virtme(kernel, accel, args.vng)
    if seconds is None:
        print(f"virtme-ng        : not measured — {how}")
    else:
        ratio = min(agent_runs) / seconds
        print(f"virtme-ng        : {seconds:6.2f} s   ({how})")
        print(f"agent-ready / virtme-ng = {ratio:.2f}  ({verdict(ratio, 0.35)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
