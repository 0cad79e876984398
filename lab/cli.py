"""`stonelab run` (scenarios → report) and `stonelab scenario check` (validate scenario files)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from lab.report import RunReport, print_terminal, write_all
from lab.runner import run_scenario
from lab.scenario import load_scenarios, load_suite
from lab.target import TargetKind

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "scenarios"


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run scenarios against the reference implementation and write a report")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO.yaml",
                     help="scenario files (default: every scenario in scenarios/)")
    run.add_argument("--report-dir", type=Path, default=Path("reports"), metavar="DIR")
    run.add_argument("--tag", action="append", default=[], help="only scenarios with this tag (repeatable)")
    run.add_argument("--target", choices=[TargetKind.HOST, TargetKind.VM], help="where scenarios not pinned to a target run (default host)")
    run.add_argument("--kernel", help="guest kernel for the vm target (default: the newest /boot/vmlinuz-*)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto", help="vm target accelerator")
    run.set_defaults(func=cmd_run)

    scenario = sub.add_parser("scenario", help="work with scenario files")
    verbs = scenario.add_subparsers(dest="scenario_command", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser("check", help="validate scenario files without running them")
    check.add_argument("files", nargs="+", metavar="SCENARIO.yaml")
    check.set_defaults(func=cmd_check)


def cmd_run(args: argparse.Namespace) -> int:
    scenarios = ([s for f in args.scenarios for s in load_scenarios(f)] if args.scenarios
                 else load_suite(DEFAULT_SUITE))
    if args.tag:
        scenarios = [s for s in scenarios if set(args.tag) & set(s.tags)]
    console = Console()
    results = []
    vm_factory = None
    if args.target == TargetKind.VM or any(s.target == TargetKind.VM for s in scenarios):  # one accelerator probe per run
        from lab.vm_target import vm_target_factory
        vm_factory = vm_target_factory(args.kernel, args.accel)
    for scenario in scenarios:
        with console.status(f"running {scenario.name}"):
            results.append(run_scenario(scenario, target=args.target, vm_factory=vm_factory))
        last = results[-1]
        console.print(f"{last.verdict:5} {scenario.name} ({last.seconds:.1f}s) {last.reason}")
    report = RunReport(results)
    print_terminal(report, console)
    for path in write_all(report, args.report_dir):
        console.print(f"wrote {path}")
    return 0 if report.passed else 1


def cmd_check(args: argparse.Namespace) -> int:
    for name in args.files:
        scenarios = load_scenarios(name)
        first = scenarios[0]
        cells = f", {len(scenarios)} matrix cells" if len(scenarios) > 1 else ""
        print(f"{name}: ok ({len(first.steps)} steps, {len(first.packages)} packages{cells})")
    return 0
