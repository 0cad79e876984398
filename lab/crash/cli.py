"""`stonelab crash explore SCENARIO` (every crash state of a scenario's power_loss steps) and
`stonelab crash replay FILE` (one reproducer, built and checked again)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lab.crash.explore import ExploreOptions
from lab.crash.model import Granularity, Model
from stonelab.errors import StonelabError


def register(sub: argparse._SubParsersAction) -> None:
    crash = sub.add_parser("crash", help="crash-state exploration under a power-loss model (docs/CRASH.md)")
    verbs = crash.add_subparsers(dest="crash_command", metavar="VERB")
    verbs.required = True
    explore = verbs.add_parser("explore", help="run a scenario on a recorded VM disk and check every crash state "
                                               "of its power_loss steps")
    explore.add_argument("scenario", type=Path, metavar="SCENARIO.yaml")
    explore.add_argument("--mode", choices=["reference", "moss-compat"],
                         help="the scenario's matrix cell with this mode, or override its mode")
    explore.add_argument("--swap", choices=["exchange", "symlink"],
                         help="the scenario's matrix cell with this swap strategy, or override it")
    explore.add_argument("--max-states", type=int, metavar="N", help="at most N crash states per power_loss step")
    explore.add_argument("--seed", type=int, metavar="S", help="seed of the sample when there are more states")
    explore.add_argument("--model", choices=[m.value for m in Model], help="power-loss model (default "
                                                                           "volatile-cache)")
    explore.add_argument("--granularity", choices=[g.value for g in Granularity],
                         help="what may persist on its own: whole requests (default) or sectors")
    explore.add_argument("--out", type=Path, metavar="DIR",
                         help="reproducers and the recording they need (default reports/crash/<scenario>)")
    explore.add_argument("--json", action="store_true", help="one JSON object: states, violations, ...")
    explore.add_argument("--kernel", help="guest kernel (default: the newest /boot/vmlinuz-*)")
    explore.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    explore.set_defaults(func=cmd_explore)
    replay = verbs.add_parser("replay", help="build and check the crash state of one reproducer file again")
    replay.add_argument("file", type=Path, metavar="REPRO.json")
    replay.add_argument("--kernel", help="guest kernel (default: the newest /boot/vmlinuz-*)")
    replay.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=cmd_replay)


def overrides(args: argparse.Namespace) -> dict:
    """The explore flags given on the command line (they win over the scenario's own step settings)."""
    given = {"model": args.model and Model(args.model), "granularity": args.granularity and
             Granularity(args.granularity), "max_states": args.max_states, "seed": args.seed}
    if args.max_states is not None and args.max_states < 1:
        raise StonelabError("--max-states must be at least 1")
    return {key: value for key, value in given.items() if value is not None}


def cmd_explore(args: argparse.Namespace) -> int:
    from lab.runner import run_scenario
    from lab.scenario import load_scenarios
    from lab.vm_target import vm_target_factory
    from reference_impl.swap import SwapStrategy
    from reference_impl.transaction import Mode
    cells = load_scenarios(args.scenario)
    if not any(step.kind == "power_loss" and step.arg.explore for step in cells[0].steps):
        raise StonelabError(f"{args.scenario}: no power_loss step to explore (add power_loss: {{during: STEP, "
                            "explore: true})")
    mode, swap = args.mode and Mode(args.mode), args.swap and SwapStrategy(args.swap)
    scenario = next((c for c in cells if mode in (None, c.mode) and swap in (None, c.swap)), cells[0])
    scenario = dataclasses.replace(scenario, mode=mode or scenario.mode, swap=swap or scenario.swap)
    out = args.out or Path("reports") / "crash" / scenario.name
    result = run_scenario(scenario, target="vm", vm_factory=vm_target_factory(args.kernel, args.accel),
                          crash_defaults=ExploreOptions(out_dir=out), crash_overrides=overrides(args))
    if result.verdict == "error" and not any(step.crash for step in result.steps):
        raise StonelabError(f"{args.scenario}: {result.reason}")
    explorations = [step.crash for step in result.steps if step.crash]
    if not explorations:
        failed = next((s for s in result.steps if s.status == "failed"), None)
        raise StonelabError(f"{args.scenario}: the run stopped before a power_loss step"
                            + (f" ({failed.description}: {failed.note})" if failed else ""))
    summary = {"scenario": scenario.name, "mode": str(scenario.mode), "swap": str(scenario.swap),
               "model": explorations[0]["model"], "states": sum(e["states"] for e in explorations),
               "violations": [v for e in explorations for v in e["violations"]],
               "explorations": explorations, "scenario_verdict": result.verdict, "reason": result.reason,
               "seconds": round(result.seconds, 1)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for e in explorations:
            print(f"{e['states']} crash states checked ({e['model']}: {e['model_description']}), "
                  f"{e['states_per_minute']} states/min in the guest")
            for boundary, count in e["per_boundary"].items():
                print(f"  {boundary}: {count} states")
        for v in summary["violations"]:
            print(f"VIOLATION {v['invariant']}: {v['detail']}\n  {v['states']} state(s); smallest: flush boundary "
                  f"{v['boundary']}, cut {v['cut']}, write set {v['write_set']}"
                  f"{' (after the command returned)' if v['after_return'] else ''}"
                  + (f"\n  reproducer: {v['reproducer']}" if v.get("reproducer") else ""))
        if not summary["violations"]:
            print("no violations")
    return 1 if summary["violations"] else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from lab.crash.replay import read_reproducer, replay
    from vm.host import kernel_from_path
    expected = read_reproducer(args.file).verdict
    verdict = replay(args.file, kernel=kernel_from_path(Path(args.kernel)) if args.kernel else None,
                     accel=args.accel)
    if args.json:
        print(json.dumps({"file": str(args.file), "violations": verdict, "expected": expected,
                          "reproduced": verdict == expected}))
    else:
        for line in verdict:
            print(f"VIOLATION {line}")
        print("no violations" if not verdict else
              ("same verdict as the exploration" if verdict == expected else "verdict differs from the exploration"))
    return 1 if verdict else 0
