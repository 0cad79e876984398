"""The reference package manager's verbs, mirroring moss: install, remove, sync, state …, faults.

Start-up cost: ``register`` and the verbs that do not open an installation (``faults``) import no more than the
standard library and ``reference_impl.faults``; the client (blit, store, stone codec, SQLite: ~0.25 s of a TCG
guest's interpreter start) is imported by ``client_for`` when a verb opens an installation. The option choices
below are therefore the enums' values spelled out; tests/test_cli_dispatch.py checks them against the enums.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from reference_impl.faults import FAULT_DESCRIPTIONS, FAULT_POINTS
from stonelab.errors import StonelabError

if TYPE_CHECKING:
    from reference_impl.client import Client, Outcome

MODE_CHOICES = ("reference", "moss-compat")                   # reference_impl.transaction.Mode
SWAP_CHOICES = ("auto", "exchange", "symlink")                # reference_impl.swap.SwapStrategy
BLIT_CHOICES = ("auto", "hardlink", "reflink", "copy")        # reference_impl.blit.BlitStrategy


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("installation")
    group.add_argument("-D", "--directory", type=Path, default=Path("/"), metavar="ROOT",
                       help="target root (default /)")
    group.add_argument("--mode", choices=MODE_CHOICES, default="reference",
                       help="reference (crash-safe) or moss-compat (upstream's exact sequence)")
    group.add_argument("--swap", choices=SWAP_CHOICES, default="auto",
                       help="how /usr is switched (auto: keep the root's layout, else probe RENAME_EXCHANGE)")
    group.add_argument("--blit", choices=BLIT_CHOICES, default="auto",
                       help="how files reach the staged tree (auto: reflink, else hard links, EXDEV → copy)")
    group.add_argument("--esp", metavar="PATH", help="synchronise boot entries on this ESP after the switch")
    group.add_argument("--root-device", metavar="DEV[:N][:subvol=PATH]",
                       help="device for root= in boot entries (a btrfs root's subvolume after :subvol=, default /)")
    group.add_argument("--no-triggers", action="store_true", help="do not run transaction triggers")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("install", parents=[common], help="install packages into a new state")
    p.add_argument("packages", nargs="+", metavar="FILE|NAME")
    p.add_argument("--repo", type=Path, metavar="DIR", help="repository directory with a stone.index")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("remove", parents=[common], help="remove packages in a new state")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("sync", parents=[common], help="upgrade installed packages from a repository")
    p.add_argument("--repo", type=Path, metavar="DIR", required=True)
    p.set_defaults(func=cmd_sync)

    state = sub.add_parser("state", help="list, show, activate, prune, remove and verify states")
    verbs = state.add_subparsers(dest="state_command", metavar="VERB")
    verbs.required = True
    p = verbs.add_parser("list", parents=[common, listing], help="list states")
    p.set_defaults(func=cmd_state_list)
    p = verbs.add_parser("show", parents=[common, listing], help="show a state and its packages")
    p.add_argument("id", type=int, nargs="?")
    p.set_defaults(func=cmd_state_show)
    p = verbs.add_parser("activate", parents=[common], help="make an archived state active (rollback)")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_state_activate)
    p = verbs.add_parser("prune", parents=[common], help="remove old states, keeping the newest N")
    p.add_argument("-k", "--keep", type=int, default=10)
    p.set_defaults(func=cmd_state_prune)
    p = verbs.add_parser("remove", parents=[common], help="remove the given states")
    p.add_argument("ids", type=int, nargs="+")
    p.set_defaults(func=cmd_state_remove)
    p = verbs.add_parser("verify", parents=[common, listing], help="re-hash the store and every state tree")
    p.add_argument("--repair", action="store_true", help="re-extract bad assets and re-blit damaged trees")
    p.set_defaults(func=cmd_state_verify)

    p = sub.add_parser("faults", parents=[listing], help="list the named fault points (STONELAB_FAULT=point:action)")
    p.set_defaults(func=cmd_faults)


def client_for(args: argparse.Namespace) -> Client:
    """The client for the installation options in ``args``, with STONELAB_FAULT armed."""
    from reference_impl.blit import BlitStrategy
    from reference_impl.client import Client, ClientOptions
    from reference_impl.faults import configured_fault, install_cut
    from reference_impl.swap import SwapStrategy
    from reference_impl.transaction import Mode

    configured_fault()  # a malformed STONELAB_FAULT is a one-line error before anything happens
    install_cut()
    options = ClientOptions(root=args.directory, mode=Mode(args.mode), swap=SwapStrategy(args.swap),
                            blit=BlitStrategy(args.blit), triggers=not args.no_triggers, esp=args.esp,
                            root_device=args.root_device)
    return Client(options)


def _print_outcome(client: Client, outcome: Outcome, started: float) -> None:
    for note in outcome.notes:
        print(note)
    if outcome.state is None:
        return
    parts = [f"state {outcome.state.id}: {outcome.state.summary}", f"{len(outcome.packages)} packages"]
    if outcome.blit is not None:
        parts.append(f"{outcome.blit.files} files blitted ({outcome.blit.strategy.value})")
    if outcome.swap is not None:
        parts.append(f"swap {outcome.swap.strategy.value}")
    parts.append(f"{time.monotonic() - started:.2f} s")
    print(", ".join(parts))


def cmd_install(args: argparse.Namespace) -> int:
    started = time.monotonic()
    files = [Path(p) for p in args.packages if p.endswith(".stone") or "/" in p or Path(p).is_file()]
    names = [p for p in args.packages if Path(p) not in files]
    with client_for(args).session() as client:
        _print_outcome(client, client.install(files, names, args.repo), started)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with client_for(args).session() as client:
        _print_outcome(client, client.remove(args.names), started)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with client_for(args).session() as client:
        _print_outcome(client, client.sync(args.repo), started)
    return 0


def _state_rows(client: Client) -> list[dict]:
    active = client.active_state()
    rows = []
    for state in client.dbs.state.all():
        tree = client.inst.usr if state.id == active else client.inst.archived(state.id)
        rows.append({"id": state.id, "type": state.type, "created": state.created, "summary": state.summary,
                     "active": state.id == active, "tree": tree.is_dir(),
                     "packages": [s.package_id for s in client.dbs.state.selections(state.id)]})
    return rows


def cmd_state_list(args: argparse.Namespace) -> int:
    with client_for(args).session() as client:
        rows = _state_rows(client)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        mark = "*" if row["active"] else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created"]))
        tree = "" if row["tree"] else "  (no tree)"
        print(f"{mark} {row['id']:>4}  {when}  {len(row['packages']):>3} packages  {row['summary'] or ''}{tree}")
    return 0


def cmd_state_show(args: argparse.Namespace) -> int:
    with client_for(args).session() as client:
        rows = {r["id"]: r for r in _state_rows(client)}
        state_id = args.id if args.id is not None else client.active_state()
        if state_id not in rows:
            raise StonelabError(f"state {state_id} does not exist")
        row = rows[state_id]
        metas = {pid: client.dbs.install.get(pid) for pid in row["packages"]}
    row["package_details"] = [{"id": pid, "name": m.name, "version": m.version, "release": m.release}
                              for pid, m in metas.items() if m is not None]
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"state {row['id']}{' (active)' if row['active'] else ''}: {row['summary'] or ''}")
    for detail in row["package_details"]:
        print(f"  {detail['name']} {detail['version']}-{detail['release']}")
    return 0


def cmd_state_activate(args: argparse.Namespace) -> int:
    with client_for(args).session() as client:
        client.activate(args.id)
    print(f"state {args.id} is active")
    return 0


def cmd_state_prune(args: argparse.Namespace) -> int:
    with client_for(args).session() as client:
        removed = client.prune(args.keep)
    print(f"removed states: {' '.join(map(str, removed)) or 'none'}")
    return 0


def cmd_state_remove(args: argparse.Namespace) -> int:
    with client_for(args).session() as client:
        removed = client.remove_states(args.ids)
    print(f"removed states: {' '.join(map(str, removed))}")
    return 0


def cmd_state_verify(args: argparse.Namespace) -> int:
    from reference_impl.verify import verify
    with client_for(args).session() as client:
        problems = verify(client, repair=args.repair)
    unresolved = [p for p in problems if not p.repaired]
    if args.json:
        print(json.dumps({"problems": [p.as_dict() for p in problems], "ok": not unresolved}))
    else:
        for problem in problems:
            print(problem.line())
        print("verify: ok" if not unresolved else f"verify: {len(unresolved)} problem(s)")
    return 0 if not unresolved else 1


def cmd_faults(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([{"point": p, "description": FAULT_DESCRIPTIONS[p]} for p in FAULT_POINTS]))
        return 0
    for point in FAULT_POINTS:
        print(f"{point:<16} {FAULT_DESCRIPTIONS[point]}")
    print("\nSTONELAB_FAULT=<point>:<crash|pause|eio>", file=sys.stderr)
    return 0
