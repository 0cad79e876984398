"""`stonelab run` (scenarios → live progress → reports), `stonelab report` (re-render, merge) and
`stonelab scenario check` (validate scenario files)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lab.target import TargetKind
from stonelab.errors import StonelabError

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "scenarios"
DEFAULT_TAG = "default"


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run scenarios against the reference implementation and write reports",
                         description="Run scenarios (files or directories; default: the scenarios tagged "
                                     f"'{DEFAULT_TAG}' in scenarios/) and write reports/<UTC time>/ and "
                                     "reports/latest. Exit status 1 when any case fails or errors.")
    run.add_argument("paths", nargs="*", metavar="PATH", help="scenario files or directories")
    run.add_argument("-k", dest="keyword", metavar="EXPR",
                     help="only cases whose name matches EXPR (words as substrings; and, or, not, parentheses)")
    run.add_argument("--tag", action="append", default=[], help="only scenarios with this tag (repeatable)")
    run.add_argument("--jobs", "-j", type=_count(1), help="cases run in parallel (default: what cores and memory allow)")
    run.add_argument("--shard", metavar="I/N", help="run the I-th of N deterministic slices of the selection (CI)")
    run.add_argument("--rerun-failures", type=_count(0), default=0, metavar="N",
                     help="run a failed case up to N more times (the report records the attempts)")
    run.add_argument("--shell-on-failure", action="store_true",
                     help="after a failed VM case, open a shell in a guest with that case's system disk (runs "
                          "cases one at a time)")
    run.add_argument("--target", choices=[TargetKind.HOST, TargetKind.VM],
                     help="where scenarios not pinned to a target run (default host)")
    run.add_argument("--kernel", help="guest kernel for the vm target (default: the newest /boot/vmlinuz-*)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto", help="vm target accelerator")
    run.add_argument("--no-snapshots", action="store_true",
                     help="boot every guest instead of restoring the one saved after boot")
    run.add_argument("--report-dir", type=Path, default=Path("reports"), metavar="DIR",
                     help="reports go to DIR/<UTC timestamp>/, DIR/latest points at the newest (default reports)")
    run.add_argument("--debug", action="store_true", help="log QEMU command lines and every guest command")
    run.add_argument("--personality", metavar="PROFILE",
                     help="emulate a kernel profile (e.g. asterinas-0.18.1) on the vm target: seccomp filter, its root fs")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="re-render a report directory, or merge shards' reports",
                            description="Re-render junit.xml, report.tap and report.html from DIR/report.json; "
                                        "with --merge, join several report directories (CI shards) into -o OUT.")
    report.add_argument("dirs", nargs="*", type=Path, metavar="DIR")
    report.add_argument("--merge", action="store_true", help="join the reports of DIR… into OUT")
    report.add_argument("-o", "--output", type=Path, metavar="OUT", help="directory of the merged report")
    report.add_argument("--schema", action="store_true", help="print the JSON Schema of report.json")
    report.set_defaults(func=cmd_report)

    scenario = sub.add_parser("scenario", help="work with scenario files")
    verbs = scenario.add_subparsers(dest="scenario_command", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser("check", help="validate scenario files without running them")
    check.add_argument("files", nargs="+", metavar="SCENARIO.yaml")
    check.set_defaults(func=cmd_check)


def cmd_run(args: argparse.Namespace) -> int:
    from lab.run import RunOptions, collect_cases, run_cases

    if args.personality:
        from lab.kernel.profile import load_profile
        load_profile(args.personality)  # a bad name is a one-line error before anything boots
        if args.target == TargetKind.HOST:
            raise StonelabError("--personality emulates a kernel in a guest: it runs on --target vm only")
        args.target = TargetKind.VM

    cases = collect_cases(args.paths or [DEFAULT_SUITE], keyword=args.keyword,
                          tags=args.tag or ([] if args.paths else [DEFAULT_TAG]), target=args.target,
                          shard_spec=args.shard)
    options = RunOptions(target=args.target, kernel=args.kernel, accel=args.accel, jobs=args.jobs,
                         rerun_failures=args.rerun_failures, shell_on_failure=args.shell_on_failure,
                         snapshots=not args.no_snapshots, personality=args.personality, report_dir=args.report_dir, shard=args.shard,
                         argv=["stonelab", *sys.argv[1:]] if sys.argv[0].endswith("stonelab") else ["stonelab", "run"],
                         rerun_base=_rerun_base(args))
    report = run_cases(cases, options)
    return 0 if report.passed else 1


def _count(least: int):
    """An argparse type: an integer of at least ``least`` (a bad value is argparse's one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: at least {least}")
        return value
    return parse


def _rerun_base(args: argparse.Namespace) -> list[str]:
    """The options a re-run of one case must repeat (where and how it ran; not the selection)."""
    words = ["stonelab", "run"]
    if args.target:
        words += ["--target", str(args.target)]
    if args.kernel:
        words += ["--kernel", args.kernel]
    if args.accel != "auto":
        words += ["--accel", args.accel]
    if args.personality:
        words += ["--personality", args.personality]
    return words


def cmd_report(args: argparse.Namespace) -> int:
    from lab.report import ReportError, ReportModel, load_report, merge_reports, render_again, write_all

    if args.schema:
        import json
        print(json.dumps(ReportModel.model_json_schema(by_alias=True), indent=2))
        return 0
    if not args.dirs:
        raise ReportError("stonelab report: name a report directory (e.g. reports/latest)")
    if args.merge:
        if args.output is None:
            raise ReportError("stonelab report --merge: name the merged report's directory with -o OUT")
        merged = merge_reports([load_report(d) for d in args.dirs], [str(d) for d in args.dirs])
        paths = write_all(merged, args.output)
        print(f"merged {len(args.dirs)} reports, {len(merged.cases)} cases: " + ", ".join(map(str, paths)))
        return 0 if merged.passed else 1
    if args.output or len(args.dirs) != 1:
        raise ReportError("stonelab report: re-render takes one DIR (use --merge -o OUT to join several)")
    paths = render_again(args.dirs[0])
    print("re-rendered " + ", ".join(map(str, paths)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from lab.scenario import load_scenarios

    for name in args.files:
        scenarios = load_scenarios(name)
        first = scenarios[0]
        cells = f", {len(scenarios)} matrix cells" if len(scenarios) > 1 else ""
        print(f"{name}: ok ({len(first.steps)} steps, {len(first.packages)} packages{cells})")
    return 0


def rerun_command(base: list[str], path: str, name: str) -> str:
    """The one command line that runs exactly the case ``name`` of the file at ``path`` again."""
    try:
        shown = os.path.relpath(path)
    except ValueError:
        shown = path
    return shlex.join([*base, shown, "-k", name])
