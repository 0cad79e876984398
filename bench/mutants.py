"""Detection power of the lab: seed one bug at a time into the reference implementation (``STONELAB_MUTANT``,
read by ``reference_impl/mutants.py``), run the scenarios meant to catch it on the host target, and print which
invariant or step caught it.

    python bench/mutants.py --list          # one mutant name a line
    python bench/mutants.py [NAME ...]      # baseline (no mutant) and every mutant (or those named)

The baseline — the same scenarios without a mutant, in the same run — must pass; a mutant is caught when at least
one of its scenarios then fails. Exit status 1 when a mutant survives (a hole in the lab) or the baseline fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.runner import ScenarioResult, run_scenario  # noqa: E402
from lab.scenario import Scenario, load_scenarios  # noqa: E402
from lab.verdict import Verdict  # noqa: E402
from reference_impl.mutants import ENV_VAR  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    scenarios: tuple[str, ...]  # scenario names (a matrix cell: "family[mode/swap]")


UPGRADE = "install-upgrade-rollback"
MUTANTS = (
    Mutant("skip-syncfs", "no syncfs between the staged tree and the intent record / switch", (UPGRADE,)),
    Mutant("swap-before-blit-complete", "the switch publishes a tree only half blitted", (UPGRADE,)),
    Mutant("drop-intent-record", "no intent record: recovery cannot finish an interrupted boot sync",
           ("window-boot-before[reference/exchange]",)),
    Mutant("hardlink-empty-files", "empty files hard-linked to one shared asset (#372)",
           ("upstream-372-empty-files[reference/exchange]",)),
    Mutant("boot-entry-before-kernel", "entries written before the kernels they name",
           ("window-boot-mid[reference/exchange]",)),
    Mutant("archive-before-swap", "the old tree is archived before the exchange", (UPGRADE,)),
    Mutant("glob-default-entry", "loader.conf default is blsforme's \"<os-id>*\" glob (#586)",
           ("upstream-586-default-entry[reference/exchange]",)),
    Mutant("recover-by-deleting", "recovery deletes the old tree found in staging instead of archiving it",
           ("window-swap-after[reference/exchange]",)),
    Mutant("skip-asset-hash-check", "`state verify` trusts content: assets and state files are not re-hashed",
           ("store-corruption", "upstream-392-repair-without-package[reference/exchange]")),
    Mutant("leave-staging", "the previous tree is left in staging after the exchange", (UPGRADE,)),
    Mutant("prune-active", "prune may remove the active state", ("prune-keeps-active[reference/exchange]",)),
    Mutant("stale-boot-entries", "prune leaves entries naming pruned states (#585)",
           ("upstream-585-prune-entries[reference/exchange]",)),
    Mutant("skip-state-id", "the staged tree gets no /usr/.stateID", (UPGRADE,)),
    Mutant("keep-treeless-states", "recovery keeps a state row whose tree never reached the disk",
           ("window-state-recorded[reference/exchange]",)),
    Mutant("swap-before-esp-check", "a boot sync that cannot fit on the ESP is found out only after the swap (#866)",
           ("esp-full-refused-before-swap[reference/exchange]",)),
    Mutant("ignore-owners", "files get the store's owner, not their layout's uid/gid (#785)",
           ("upstream-785-file-owners[reference/exchange]",)),
    Mutant("shared-inode-mode", "files sharing content share one inode whose mode the last link sets (#834)",
           ("upstream-834-shared-inode-mode[reference/exchange]",)),
    Mutant("no-exdev-fallback", "a store on another filesystem fails the blit with EXDEV instead of copying (#659)",
           ("upstream-659-store-on-another-filesystem[reference/exchange]",)),
    Mutant("leak-blit-fds", "one file descriptor left open per blitted file (the regression #844 fixed, #841)",
           ("upstream-841-open-files-limit[reference/exchange]",)),
    Mutant("no-flush", "the root is mounted barrier=0: fsync/syncfs never send a cache FLUSH (crash engine)",
           ("crash-reference[reference/exchange]",)),
)


def caught_by(result: ScenarioResult) -> str:
    """What made the scenario fail: the unexpected invariants, or the failing step."""
    if result.verdict == Verdict.ERROR:
        return f"lab error: {result.reason}"
    unexpected = sorted(set(result.observed_violations) - set(result.expected_violations))
    failed = [s for s in result.steps if s.status == "failed"]
    parts = [", ".join(unexpected)] if unexpected else []
    if failed:
        parts.append(f"step {failed[0].description}")
    if not parts and result.verdict == Verdict.FAIL:
        parts.append(result.reason)
    return "; ".join(parts)


def run(scenario: Scenario, mutant: str | None) -> ScenarioResult:
    previous = os.environ.pop(ENV_VAR, None)
    if mutant:
        os.environ[ENV_VAR] = mutant
    try:
        return run_scenario(scenario)
    finally:
        os.environ.pop(ENV_VAR, None)
        if previous is not None:
            os.environ[ENV_VAR] = previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutant names, one a line")
    parser.add_argument("names", nargs="*", help="only these mutants")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(m.name for m in MUTANTS))
        return 0
    unknown = sorted(set(args.names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; see --list")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    suite = {s.name: s for f in sorted((REPO / "scenarios").glob("*.yaml")) for s in load_scenarios(f)}
    needed = sorted({n for m in chosen for n in m.scenarios})
    missing = [n for n in needed if n not in suite]
    if missing:
        parser.error(f"scenario(s) {', '.join(missing)} not in scenarios/")
    started = time.monotonic()
    baseline = {name: run(suite[name], None) for name in needed}
    base_seconds = time.monotonic() - started
    broken = [n for n, r in baseline.items() if r.verdict != Verdict.PASS]
    for name in needed:
        print(f"baseline  {name}: {baseline[name].verdict} ({baseline[name].seconds:.1f} s)", flush=True)
    survivors = []
    for mutant in chosen:
        hits = []
        for name in mutant.scenarios:
            result = run(suite[name], mutant.name)
            if result.verdict == Verdict.FAIL and name not in broken:
                hits.append(f"{name}: {caught_by(result)}")
            elif result.verdict == Verdict.ERROR:
                hits.append(f"{name}: NOT JUDGED ({result.reason})")
        caught = any("NOT JUDGED" not in h for h in hits)
        if not caught:
            survivors.append(mutant.name)
        print(f"{'caught  ' if caught else 'SURVIVED'}  {mutant.name:26} {mutant.bug}", flush=True)
        for hit in hits:
            print(f"          {hit}")
    total = len(chosen)
    print(f"\n{total - len(survivors)}/{total} mutants caught ({(total - len(survivors)) / total:.0%}); "
          f"baseline {len(needed) - len(broken)}/{len(needed)} scenarios pass ({base_seconds:.0f} s); "
          f"whole run {time.monotonic() - started:.0f} s")
    if survivors:
        print("survivors (holes in the lab): " + ", ".join(survivors))
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
