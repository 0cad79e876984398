"""`stonelab kernel trace|probe|gaps` and `stonelab compat report`: what the reference needs from a kernel, what a
kernel does, the gaps, and the report a porter reads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.kernel.gaps import analyse, gaps_json
from lab.kernel.probe import FILESYSTEMS, probe_here
from lab.kernel.profile import PROFILE_DIR, load_profile, probed_profile
from lab.kernel.trace import REQUIREMENTS, default_requirements, load_requirements
from stonelab.errors import StonelabError


def _fs_list(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in FILESYSTEMS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: filesystems are a comma-separated subset of "
                                         f"{','.join(FILESYSTEMS)}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    kernel = sub.add_parser("kernel", help="kernel compatibility: trace, probe, gaps")
    verbs = kernel.add_subparsers(dest="kernel_command", metavar="VERB")
    verbs.required = True

    p = verbs.add_parser("trace", help="trace every operation of the reference in the Linux guest (requirements)")
    p.add_argument("-o", "--output", type=Path,
                   help="requirements JSON (default: compat/requirements.json; with --systems "
                        "compat/requirements-systems.json)")
    p.add_argument("--systems", action="store_true",
                   help="trace the real systems under test (Nix, OSTree) instead of the reference")
    p.add_argument("--host", action="store_true", help="trace on this machine's kernel instead of the guest")
    p.add_argument("--kernel", help="guest kernel (default: the newest /boot/vmlinuz-*)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--jobs", type=int, default=2, help="guest vCPUs, and independent operations traced at a time")
    p.add_argument("--no-snapshots", action="store_true", help="boot the guest instead of restoring a saved one")
    p.add_argument("--only", action="append", default=[], metavar="PREFIX",
                   help="trace only the operations whose name starts with PREFIX (repeatable)")
    p.set_defaults(func=cmd_trace)

    p = verbs.add_parser("probe", help="semantic probe: on a booted kernel (--kernel) or here (DIR…)")
    p.add_argument("directories", nargs="*", type=Path, help="directories to probe on this machine's kernel")
    p.add_argument("--kernel", type=Path, help="boot this kernel image with the probe")
    p.add_argument("--initrd", type=Path, help="the kernel's own initramfs (the probe is appended to it)")
    p.add_argument("--boot", choices=["linux", "multiboot", "uefi"], default="linux")
    p.add_argument("--module", action="append", default=[], metavar="'PATH [ARGS]'",
                   help="a multiboot module before the probe's initramfs (repeatable; e.g. Xen's dom0 kernel)")
    p.add_argument("--append", help="the booted kernel's command line (default: console=ttyS0 panic=-1 rdinit=/init)")
    p.add_argument("--fs", type=_fs_list, default=list(FILESYSTEMS),
                   help=f"filesystems to probe (default {','.join(FILESYSTEMS)})")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--name", help="profile name (default: from the kernel's release)")
    p.add_argument("-o", "--output", type=Path,
                   help="write the profile here (default with --kernel: compat/profiles/<name>.json)")
    p.add_argument("--console", type=Path, help="save the guest console (the evidence, also of a boot that failed) here")
    p.set_defaults(func=cmd_probe)

    p = verbs.add_parser("gaps", help="what a kernel lacks for the requirements, with consequences")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="a kernel profile: name in compat/profiles or a path")
    source.add_argument("--probe-log", type=Path, help="console output of the probe")
    p.add_argument("--trace", type=Path, action="append", metavar="REQUIREMENTS",
                   help="requirements file (repeatable; default compat/requirements.json and, when present, "
                        "compat/requirements-systems.json)")
    p.add_argument("--fs", default=None, help="filesystem of the root to judge (default: the profile's root)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gaps)

    from lab.kernel.report import register as register_report
    register_report(sub)


def cmd_trace(args: argparse.Namespace) -> int:
    import time
    started = time.monotonic()
    if args.jobs < 1:
        raise StonelabError(f"--jobs {args.jobs}: must be at least 1")
    if args.systems:
        from lab.kernel.trace import SYSTEMS_REQUIREMENTS
        from lab.kernel.trace_systems import trace_systems_in_guest
        trace = trace_systems_in_guest(accel=args.accel)
        args.output = args.output or SYSTEMS_REQUIREMENTS
    elif args.host:
        import tempfile

        from lab.kernel.trace import run_workload
        from vm.disk import DiskLayout, build_disk
        with tempfile.TemporaryDirectory(prefix="stonelab-trace-") as tmp:
            disk = build_disk(Path(tmp) / "esp.img", DiskLayout(esp_mib=48, root_mib=8))
            trace = run_workload(Path(tmp), f"{disk.path}:1", root_device=f"{disk.path}:2", jobs=args.jobs,
                                 only=tuple(args.only), traced_on="this machine's kernel (--host)")
    else:
        from lab.kernel.trace import trace_in_guest
        traces, _ = trace_in_guest(args.kernel, args.accel, only=tuple(args.only), jobs=args.jobs,
                                   snapshots=not args.no_snapshots)
        trace = traces[0]
    args.output = args.output or REQUIREMENTS
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(trace.to_json())
    transaction = sum(f.category == "transaction" for f in trace.features)
    print(f"wrote {args.output}: {len(trace.features)} features ({transaction} transaction) over "
          f"{len(trace.phases)} phases in {time.monotonic() - started:.0f} s")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    if args.kernel is None:
        if not args.directories:
            raise StonelabError("kernel probe: give --kernel IMAGE (boot it) or directories to probe here")
        output = probe_here(args.directories)
        if args.output:
            args.output.write_text(output)
        sys.stdout.write(output)
        return 0
    from lab.kernel.boot import probe_kernel
    run = probe_kernel(args.kernel, initrd=args.initrd, boot=args.boot, filesystems=args.fs, accel=args.accel,
                       name=args.name, modules=args.module, append=args.append, console_path=args.console)
    output = args.output or PROFILE_DIR / f"{run.profile.name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(run.profile.to_json())
    Console().print(_profile_table(run.profile))
    print(f"wrote {output} ({run.profile.facts})")
    return 0


def _profile_table(profile) -> Table:
    table = Table(title=f"{profile.name}: {profile.evidence}", show_lines=False)
    table.add_column("feature")
    filesystems = profile.filesystems or ["*"]
    for fs in filesystems:
        table.add_column(fs)
    for key in sorted(profile.results):
        table.add_row(key, *[(profile.exact(key, fs).short() if profile.exact(key, fs) else "") for fs in filesystems])
    return table


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise StonelabError(f"{path}: cannot read the {what} ({err.strerror})") from None


def cmd_gaps(args: argparse.Namespace) -> int:
    if args.profile:
        profile = load_profile(args.profile)
    else:
        profile = probed_profile(args.probe_log.name, "", _read(args.probe_log, "probe log"), str(args.probe_log))
    filesystem = profile.judged_filesystem(args.fs, f"--fs {args.fs}")
    gaps = analyse(load_requirements(args.trace or default_requirements()), profile, filesystem)
    if args.json:
        print(gaps_json(gaps, profile, filesystem))
        return 0
    table = Table(title=f"{profile.name} on {filesystem} ({profile.evidence})", show_lines=True)
    for column in ("feature", "result", "severity", "consequence", "workaround", "evidence"):
        table.add_column(column, overflow="fold")
    for gap in gaps:
        table.add_row(gap.feature, gap.result, gap.severity, gap.consequence, gap.workaround, gap.evidence)
    Console(width=180).print(table)
    blockers = sum(g.severity == "blocker" for g in gaps)
    print(f"{len(gaps)} gaps, {blockers} blockers")
    return 0
