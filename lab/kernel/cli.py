"""`stonelab kernel trace|probe|gaps`: what the reference needs from a kernel, and what a kernel lacks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.kernel.gaps import KernelProfile, analyse, documented_profile, gaps_json, probed_profile
from lab.kernel.probe import probe_here
from lab.kernel.trace import Trace, trace_reference
from stonelab.errors import StonelabError


def register(sub: argparse._SubParsersAction) -> None:
    kernel = sub.add_parser("kernel", help="kernel compatibility: trace, probe, gaps")
    verbs = kernel.add_subparsers(dest="kernel_command", metavar="VERB")
    verbs.required = True

    p = verbs.add_parser("trace", help="trace the system calls the reference implementation makes")
    p.add_argument("-o", "--output", type=Path, help="write the trace as JSON here (default: stdout summary)")
    p.set_defaults(func=cmd_trace)

    p = verbs.add_parser("probe", help="run the feature probe on this kernel in the given directories")
    p.add_argument("directories", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, help="save the probe's lines here")
    p.set_defaults(func=cmd_probe)

    p = verbs.add_parser("gaps", help="what a kernel lacks for the traced features, with consequences")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="a documented kernel profile, e.g. asterinas-0.18.1")
    source.add_argument("--probe-log", type=Path, help="console output of `stonelab kernel probe` (or a guest run)")
    p.add_argument("--trace", type=Path, help="a saved trace (default: trace now)")
    p.add_argument("--fs", default="ext2", help="filesystem of the root to judge (default ext2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gaps)


def cmd_trace(args: argparse.Namespace) -> int:
    trace = trace_reference()
    if args.output:
        args.output.write_text(trace.to_json())
        print(f"wrote {args.output}: {len(trace.features)} features over {len(trace.phases)} phases")
        return 0
    for feature in trace.features:
        if feature.category == "transaction":
            errors = " ".join(f"{k}×{v}" for k, v in feature.errors.items())
            print(f"{feature.key:<40} {feature.calls:>7}  {errors}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    output = probe_here(args.directories)
    if args.output:
        args.output.write_text(output)
    sys.stdout.write(output)
    return 0


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise StonelabError(f"{path}: cannot read the {what} ({err.strerror})") from None


def _load_trace(path: Path | None) -> Trace:
    if path is None:
        return trace_reference()
    return Trace.from_json(_read(path, "trace"), str(path))


def cmd_gaps(args: argparse.Namespace) -> int:
    trace = _load_trace(args.trace)
    profile: KernelProfile
    if args.profile:
        profile = documented_profile(args.profile)
    else:
        profile = probed_profile(str(args.probe_log), _read(args.probe_log, "probe log"))
    gaps = analyse(trace, profile, args.fs)
    if args.json:
        print(gaps_json(gaps, profile, args.fs))
        return 0
    table = Table(title=f"{profile.name} on {args.fs}: {profile.evidence}", show_lines=True)
    for column in ("feature", "result", "severity", "consequence", "workaround"):
        table.add_column(column, overflow="fold")
    for gap in gaps:
        table.add_row(gap.feature, gap.result, gap.severity, gap.consequence, gap.workaround)
    Console(width=160).print(table)
    blockers = sum(g.severity == "blocker" for g in gaps)
    print(f"{len(gaps)} gaps, {blockers} blockers")
    return 0
