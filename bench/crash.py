"""Crash-engine benchmark (issue 10): one command, one run, figures and ratios.

  .venv/bin/python bench/crash.py [--kernel K] [--accel auto|kvm|tcg] [--states N] [--transactions N]

Measures:
  rate      crash states checked per minute in the guest (volatile-cache model, reference implementation,
            an upgrade explored with at most N states), with the mean seconds of each phase per state
            (snapshot, apply, mount, recovery, observe, umount) — what bounds the rate;
  overhead  the same transactions on two VM targets up at once, one recording (blklogwrites) and one not,
            interleaved with alternating order: ratio of the median transaction times.
Targets: ≥ 60 states/min; recording overhead ≤ 1.5×.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.crash.check import Oracle  # noqa: E402
from lab.crash.explore import ExploreOptions, explore  # noqa: E402
from lab.invariants import ExpectedTree  # noqa: E402
from lab.packages import PackageDecl, build_packages, expected_tree  # noqa: E402
from lab.runner import run_cache_dir  # noqa: E402
from lab.vm_target import VmTarget  # noqa: E402
from vm.accel import AccelSelector  # noqa: E402
from vm.host import default_kernel, kernel_from_path  # noqa: E402


def packages(count: int) -> dict[str, PackageDecl]:
    return {f"p{i}": PackageDecl(key=f"p{i}", name="hello", version=str(i),
                                 files={"bin/hello": f"{i}\n", f"share/hello/{i}": "x" * 3000 * i})
            for i in range(1, count + 1)}


def install(target: VmTarget, path: Path) -> float:
    started = time.monotonic()
    result = target.stonelab(["install", "-D", str(target.root), "--swap", "exchange", target.path_for_package(path)])
    if not result.ok:
        raise SystemExit(f"install failed: {result.summary()}")
    return time.monotonic() - started


def rate(kernel, selector, accel: str, states: int, work: Path) -> None:
    decls = packages(2)
    built, decls = build_packages(decls, work / "packages")
    with VmTarget(work / "rate", kernel=kernel, accel=accel, selector=selector) as target:
        install(target, built["p1"])
        baseline = target.observe().outside
        install(target, built["p2"])
        start, end = target.marks[-2], target.marks[-1]
        old, new = expected_tree([decls["p1"]]), expected_tree([decls["p2"]])
        oracle = Oracle(old, ExpectedTree("new " + new.label, new.files), True, baseline)
        found = explore(target, start.log_bytes, end.log_bytes, end.exit_status or 0, oracle,
                        ["state", "list", "-D", "{root}", "--mode", "reference", "--swap", "exchange"],
                        ExploreOptions(max_states=states))
    print(f"rate: {found.states} states in {found.guest_seconds:.1f} s in the guest = "
          f"{found.states_per_minute:.1f} states/min (target >= 60); violations: {len(found.violations)}")
    print("  mean seconds per state: " + ", ".join(f"{k} {v:.3f}" for k, v in found.phase_seconds.items()))


def overhead(kernel, selector, accel: str, transactions: int, work: Path) -> None:
    decls = packages(transactions)
    built, decls = build_packages(decls, work / "packages-overhead")
    times: dict[bool, list[float]] = {True: [], False: []}
    with ExitStack() as stack:  # both guests up at once, their transactions interleaved (A/B, order alternating)
        # the plain one on the host root over 9p with two vCPUs too (as a recording guest is): only recording differs
        targets = {record: stack.enter_context(VmTarget(work / f"overhead-{record}", kernel=kernel, accel=accel,
                                                        selector=selector, record=record, host_userland=True,
                                                        cpus=2))
                   for record in (False, True)}
        for target in targets.values():
            install(target, built["p1"])  # warm: the first transaction creates the store and databases
        for turn, key in enumerate(list(built)[1:]):
            for record in ((False, True) if turn % 2 == 0 else (True, False)):
                times[record].append(install(targets[record], built[key]))
    plain, recorded = statistics.median(times[False]), statistics.median(times[True])
    print(f"overhead: median transaction {recorded:.2f} s recorded vs {plain:.2f} s plain = "
          f"{recorded / plain:.2f}x (target <= 1.5x); runs {[round(t, 2) for t in times[True]]} vs "
          f"{[round(t, 2) for t in times[False]]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    parser.add_argument("--states", type=int, default=60)
    parser.add_argument("--transactions", type=int, default=6)
    args = parser.parse_args()
    kernel = kernel_from_path(Path(args.kernel)) if args.kernel else default_kernel()
    selector = AccelSelector()
    with tempfile.TemporaryDirectory(prefix="bench-crash-", dir=run_cache_dir()) as tmp:
        overhead(kernel, selector, args.accel, args.transactions, Path(tmp))
        rate(kernel, selector, args.accel, args.states, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
