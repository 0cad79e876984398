"""`stonelab boot probe|sync|status`."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from reference_impl.boot.device import Volume, check_disk_path, probe_disk, probe_volume, root_argument
from reference_impl.boot.gpt import EFIVARS_DIR, has_gpt, read_gpt
from reference_impl.boot.sync import boot_status, sync_boot
from stonelab.errors import StonelabError


def register(subparsers: argparse._SubParsersAction) -> None:
    boot = subparsers.add_parser("boot", help="boot management: probe disks, sync and check the ESP")
    sub = boot.add_subparsers(dest="boot_command", metavar="ACTION")
    sub.required = True

    probe = sub.add_parser("probe", help="filesystem type/UUID/label of an image or device, or each GPT partition")
    probe.add_argument("--json", action="store_true", help="JSON output")
    probe.add_argument("--subvol", default=None, help="btrfs subvolume for root= (default /)")
    probe.add_argument("device", help="DEVICE_OR_IMAGE")
    probe.set_defaults(func=cmd_probe)

    for name, func, text in (("sync", cmd_sync, "write systemd-boot, kernels and one entry per state to the ESP"),
                             ("status", cmd_status, "compare the ESP's entries with the states on disk")):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("-D", "--directory", dest="root", type=Path, default=Path("/"),
                            help="installation root (default /)")
        parser.add_argument("--esp", default=None,
                            help="ESP: mounted directory, FAT image/device, GPT disk image, or IMG:PARTNUM "
                                 "(default: discovered)")
        parser.add_argument("--efivars", type=Path, default=EFIVARS_DIR, help="efivarfs directory")
        parser.add_argument("--json", action="store_true", help="JSON output")
        parser.add_argument("--no-vfat-check", action="store_true",
                            help="accept an ESP directory that is not a vfat mount (testing only)")
        parser.set_defaults(func=func)
        parser.add_argument("--root-device", default=None,
                            help="DEV_OR_IMG[:PARTNUM][:subvol=PATH] holding the root filesystem (PATH: its btrfs "
                                 "subvolume, default /): root= of this installation "
                                 "(default: from /proc/self/mountinfo)")
        if name == "sync":
            parser.add_argument("--state", type=int, default=None, help="state to boot by default (default: active)")
            parser.add_argument("--rebuild", action="store_true",
                                help="format the ESP when it holds no FAT filesystem, then repopulate it")


def cmd_probe(args: argparse.Namespace) -> int:
    path = Path(args.device)
    if not path.exists():
        raise StonelabError(f"{path}: no such disk image or device")
    check_disk_path(path)
    if has_gpt(path):
        rows = []
        for rep in probe_disk(read_gpt(path)):
            fs = rep.fs
            root = rep.root
            if fs is not None and fs.type == "btrfs" and args.subvol:
                root = root_argument(fs, rep.partition, args.subvol)
            rows.append({"number": rep.partition.number, "type_guid": rep.partition.type_guid,
                         "part_guid": rep.partition.part_guid, "name": rep.partition.name,
                         "fstype": fs.type if fs else None, "uuid": fs.uuid if fs else None,
                         "label": fs.label if fs else None, "root": root})
        if args.json:
            print(json.dumps({"device": str(path), "partitions": rows}, indent=2))
        else:
            for row in rows:
                print(" ".join(f"{key}={_quote(value)}" for key, value in row.items()))
        return 0
    fs = probe_volume(Volume(str(path)))
    if fs is None:
        raise StonelabError(f"{path}: no known filesystem superblock and no GPT")
    row = {"fstype": fs.type, "uuid": fs.uuid, "label": fs.label, "version": fs.version,
           "root": root_argument(fs, None, args.subvol)}
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(" ".join(f"{key}={_quote(value)}" for key, value in row.items()))
    return 0


def _quote(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"'\\" for c in text)) else text


def cmd_sync(args: argparse.Namespace) -> int:
    report = sync_boot(args.root, esp=args.esp, root_device=args.root_device, efivars=args.efivars,
                       target=args.state, rebuild=args.rebuild, require_vfat=not args.no_vfat_check)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    if report.formatted:
        print(f"{report.esp}: formatted (FAT)")
    for note in report.notes:
        print(f"stonelab: warning: {note}", file=sys.stderr)
    print(f"{report.esp}: {len(report.entries)} entries (entry token {report.entry_token}), "
          f"default {report.default_entry or '-'}; "
          f"{len(report.written)} files written, {len(report.removed)} removed")
    for name in report.entries:
        print(f"  {name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = boot_status(args.root, esp=args.esp, efivars=args.efivars, require_vfat=not args.no_vfat_check,
                         root_device=args.root_device)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(f"{status.esp}: active state {status.active_state}, default {status.default_entry or '-'}")
        for entry in status.entries:
            if entry.owner == "this":
                flag = "ok" if not entry.missing_files and entry.state_tree_exists else "BROKEN"
                print(f"  {entry.name}  state {entry.state_id}  {flag}")
            else:
                what = "another installation" if entry.owner == "other" else "not written by stonelab"
                print(f"  {entry.name}  {what}  {entry.root or '-'}")
        for line in status.other_installations:
            print(f"other installation: {line}")
        for note in status.notes:
            print(f"stonelab: note: {note}", file=sys.stderr)
        for problem in status.problems:
            print(f"problem: {problem}")
    return 1 if status.problems else 0
