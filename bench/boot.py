"""Boot benchmark: one command, same kernel, same run, figures and ratios against baselines measured alongside.

  .venv/bin/python bench/boot.py [--kernel K] [--accel auto|kvm|tcg] [--runs N] [--vng PATH]

Measures (wall clock, best of N; the machine may be shared, so the spread is printed too):
  bare        busybox initramfs whose init only powers off (baseline a): to QEMU exit
  agent       the lab's guest on the EROFS userland image: to agent-ready (fresh boot)
  agent-9p    the same guest with the host root over 9p (the previous design): to agent-ready
  restore     the agent guest restored from its saved state (vm.snapshot) to agent-ready, and to resumed
              (disks rescanned, clock set)
  no-op verb  `stonelab faults` in the guest: on the EROFS image restored, forked from the guest's warm
              interpreter (vm.zygote, how the lab runs guest commands) and started fresh (lazy command dispatch, warm
              page cache), against a fresh 9p guest importing every command module (how each guest command started
              before); `--only-noop` measures just these
  virtme-ng   `vng --run KERNEL --exec true`, --runs times (baseline b; --disable-kvm under TCG). Installed by `make bench` into
              .bench-venv from PyPI — never downloaded here; without it that line says how to get it.
  where      where the time of a fresh boot goes (medians; guest uptimes from the console markers of the init and
             the agent's ready event): before the kernel's clock starts (QEMU, firmware, kernel decompression), kernel
             to init, the init's module loading, mounting the userland, the agent's interpreter start
Targets: agent-ready ≤ 1.3 × bare, ≤ 0.35 × virtme-ng; restore to agent-ready ≤ 1.5 s; no-op verb ≤ 0.5 × before.
The no-op verb's zygote ratio (forked / fresh, same restored guest) has no target of the issue; it is printed beside.
"""
from __future__ import annotations

import argparse
import os
import re
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


MARKER_UPTIME = re.compile(r"(STONELAB-[A-Z-]+) uptime=([0-9.]+)")


def _uptimes(console: str) -> dict[str, float]:
    """The guest's uptime (seconds) at each ``STONELAB-… uptime=`` marker of the console."""
    return {name: float(value) for name, value in MARKER_UPTIME.findall(console)}


def bare(kernel, accel) -> tuple[float, dict[str, float]]:
    """(seconds to QEMU's exit, {phase: seconds}) of the bare initramfs."""
    config = MachineConfig(accel=accel, kernel=kernel, initrd=build_initramfs(kernel, "bare").path,
                           append="console=ttyS0 quiet panic=-1 no_timer_check", share_host_root=False, agent=False)
    started = time.monotonic()
    with Machine(config, name="bench-bare", transport=ConsoleTransport()) as guest:
        guest.wait_for_console(BARE_MARKER, 300)
        at_marker = time.monotonic() - started
        guest.wait_for_exit(300)
        uptime = _uptimes(guest.console.text).get(BARE_MARKER, 0.0)
    seconds = time.monotonic() - started
    return seconds, {"before the kernel": at_marker - uptime, "kernel to init": uptime,
                     "power-off": seconds - at_marker}


def blank_disk(directory: Path) -> DiskSpec:
    path = directory / "sut.img"
    with open(path, "wb") as handle:
        handle.truncate(322 << 20)  # the VM target's disk size: 64 MiB ESP + 256 MiB root + GPT
    return DiskSpec(path)


AGENT_PHASES = (("kernel to init", None, "STONELAB-INIT"), ("modules", "STONELAB-INIT", "STONELAB-MODULES"),
                ("userland mounts", "STONELAB-MODULES", "STONELAB-USERLAND"), ("agent start", "STONELAB-USERLAND", "ready"))


def agent_ready(config) -> tuple[float, dict[str, float]]:
    """(seconds to agent-ready, {phase: seconds}) of a fresh agent guest."""
    started = time.monotonic()
    with Machine(config, name="bench-agent") as guest:
        ready = time.monotonic() - started
        marks = {None: 0.0, **_uptimes(guest.console.text), "ready": guest.boots[-1]["guest_uptime"] or 0.0}
        guest.shutdown()
    phases = {"before the kernel": ready - marks["ready"]}
    for phase, start, end in AGENT_PHASES:
        if start in marks and end in marks:
            phases[phase] = marks[end] - marks[start]
    return ready, phases


def where(kind: str, runs: list[tuple[float, dict[str, float]]]) -> str:
    phases = runs[0][1]
    return f"{kind:<17}: " + ", ".join(f"{phase} {statistics.median(r[1].get(phase, 0.0) for r in runs):.2f} s"
                                          for phase in phases)


def restored(config, state: Path) -> tuple[float, float]:
    started = time.monotonic()
    with Machine(config, name="bench-restore", restore_from=state) as guest:
        ready = time.monotonic() - started
        resume(guest)
        return ready, time.monotonic() - started


NOOP = ["-m", "stonelab.cli", "faults"]
NOOP_EAGER = ["-c", "import sys; from stonelab.cli import build_parser, main; build_parser(); main(['faults'])"]


def noop_seconds(guest, argv: list[str], runs: int, warm: bool = False) -> float:
    """Best wall time of ``python ARGV`` in ``guest`` over ``runs`` (``warm``: forked from the guest's zygote,
    which must have served it)."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        result = guest.execute([sys.executable, *argv], 600, cwd=str(ROOT), warm=warm)
        times.append(time.monotonic() - started)
        if result.exit_code != 0 or result.forked != warm:
            raise SystemExit(f"no-op verb: exit {result.exit_code}, forked {result.forked}: {result.stderr[-300:]}")
    return min(times)


def noop_figures(image_config, nine_p_config, state: Path, runs: int) -> None:
    with Machine(image_config, name="bench-noop", restore_from=state) as guest:
        resume(guest)
        warm = noop_seconds(guest, NOOP, runs + 1, warm=True)
        new = noop_seconds(guest, NOOP, runs + 1)
        warm = min(warm, noop_seconds(guest, NOOP, runs + 1, warm=True))  # interleaved against load changes
    with Machine(nine_p_config, name="bench-noop-9p") as guest:
        old = noop_seconds(guest, NOOP_EAGER, runs + 1)
    print(f"no-op verb       : `stonelab faults` forked from the zygote {warm:.2f} s, a fresh interpreter "
          f"{new:.2f} s (EROFS, restored, lazy), before: {old:.2f} s (9p, every command module)")
    print(f"no-op verb zygote / fresh = {warm / new:.2f}; fresh / before = {new / old:.2f}")
    print(f"no-op verb as the lab runs it (zygote) / before = {warm / old:.2f}  ({verdict(warm / old, 0.5)})")


def virtme(kernel, accel, vng: str | None, runs: int = 1) -> tuple[list[float] | None, str]:
    """Times of ``runs`` runs of `vng --run KERNEL --exec true` (seconds), or None and exactly why it could not be
    measured."""
    times: list[float] = []
    for _ in range(runs):
        seconds, how = _virtme_once(kernel, accel, vng)
        if seconds is None:
            return None, how
        times.append(seconds)
    return times, how


def _virtme_once(kernel, accel, vng: str | None) -> tuple[float | None, str]:
    """Time of one `vng --run KERNEL --exec true`, or None and exactly why it could not be measured."""
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
    parser.add_argument("--only-noop", action="store_true", help="measure only the no-op verb")
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
        if args.only_noop:
            noop_figures(image_config, nine_p_config, saved_state(image_config), args.runs)
            return 0
        bare_runs, agent_runs, ninep_runs = [], [], []
        bare_phases, agent_phases = [], []
        for _ in range(args.runs):  # interleaved, so that a load change hits every kind alike
            bare_phases.append(bare(kernel, accel))
            agent_phases.append(agent_ready(image_config))
            ninep_runs.append(agent_ready(nine_p_config)[0])
        bare_runs, agent_runs = [r[0] for r in bare_phases], [r[0] for r in agent_phases]
        print(f"bare initramfs   : power-off {spread(bare_runs)}")
        print(f"agent (EROFS)    : ready     {spread(agent_runs)}")
        print(f"agent (9p, old)  : ready     {spread(ninep_runs)}")
        ratio = min(agent_runs) / min(bare_runs)
        paired = statistics.median(a / b for a, b in zip(agent_runs, bare_runs))
        print(f"agent-ready / bare boot = {ratio:.2f}  ({verdict(ratio, 1.3)}; best against best); run by run "
              f"(interleaved pairs) median {paired:.2f}; 9p guest was {min(ninep_runs) / min(bare_runs):.2f}")
        print("where the time goes (medians):")
        print(where("  bare", bare_phases))
        print(where("  agent (EROFS)", agent_phases))

        started = time.monotonic()
        state = saved_state(image_config)
        print(f"saved state      : {state.stat().st_size >> 20} MiB (made or found in {time.monotonic() - started:.1f} s)")
        restore_runs = [restored(image_config, state) for _ in range(args.runs)]
        best_ready = min(r[0] for r in restore_runs)
        print(f"restore          : to agent-ready {spread([r[0] for r in restore_runs])}; "
              f"to resumed {spread([r[1] for r in restore_runs])}")
        print(f"restore to agent-ready = {best_ready:.2f} s  ({verdict(best_ready, 1.5)})")

        noop_figures(image_config, nine_p_config, state, args.runs)

    times, how = virtme(kernel, accel, args.vng, args.runs)
    if times is None:
        print(f"virtme-ng        : not measured — {how}")
    else:
        ratio = min(agent_runs) / min(times)
        print(f"virtme-ng        : {spread(times)}   ({how})")
        print(f"agent-ready / virtme-ng = {ratio:.2f}  ({verdict(ratio, 0.35)}; best against best), "
              f"median against median {statistics.median(agent_runs) / statistics.median(times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
