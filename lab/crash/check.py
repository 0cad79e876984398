"""Judge one materialised crash state: the lab's invariants plus ALICE's contract for the operation under test.

*ALICE's contract* (Pillai et al., OSDI '14, "All File Systems Are Not Created Equal"): an operation that
reported success survives a crash; any other leaves the old state or the new one — never neither, never a mix.
Here: when the cut came after the command returned with exit 0, ``/usr`` must be the new tree
(``durable_success``); otherwise it must be the old or the new tree (``atomic_usr``).  The other invariants are
the lab's own, from its registry (``lab/invariants.py``): ``usr_is_one_state`` (/usr against the layout the
database records for the active state), ``state_id_matches``, ``no_orphan_states``, ``staging_empty``,
``stateless``, ``store_integrity``; ``recovers`` fails when the file system does not mount or the recovery verb
fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lab import invariants as inv
from lab.invariants import CRASH_STATE_INVARIANTS, INVARIANTS, CheckContext, ExpectedTree, Violation
from lab.probe import Observation

CRASH_INVARIANTS = tuple(CRASH_STATE_INVARIANTS)


@dataclass(frozen=True)
class Oracle:
    """What the lab knows independently of the system under test: the tree before the operation (``old``), the
    tree it promised (``new``), whether it reported success, the files outside /usr before the run, the
    invariants enabled, and which system is judged (``reference`` or a :class:`lab.systems.SystemName`)."""

    old: ExpectedTree
    new: ExpectedTree
    succeeded: bool
    baseline: dict[str, list] = field(default_factory=dict)
    invariants: tuple[str, ...] = tuple(INVARIANTS)
    system: str = "reference"

    def to_dict(self) -> dict:
        return {"old": {"label": self.old.label, "files": self.old.files},
                "new": {"label": self.new.label, "files": self.new.files},
                "succeeded": self.succeeded, "baseline": self.baseline, "invariants": list(self.invariants),
                "system": self.system}

    @classmethod
    def from_dict(cls, data: dict) -> Oracle:
        return cls(ExpectedTree(**data["old"]), ExpectedTree(**data["new"]), bool(data["succeeded"]),
                   dict(data.get("baseline") or {}), tuple(data.get("invariants") or ()),
                   str(data.get("system") or "reference"))


# the lab's invariants that judge a root from its observation alone (no trace, no ESP, no boot)
ROOT_INVARIANTS = ("atomic_usr", "usr_is_one_state", "staging_empty", "state_id_matches", "no_orphan_states",
                   "stateless", "store_integrity")


def judge(result: dict, oracle: Oracle, after_return: bool) -> list[Violation]:
    """Violations of one state from the guest's result (``error`` | ``mount_error`` | ``recovery`` +
    ``observation`` or ``read_error``):
    ``recovers``, the lab's root invariants (:data:`ROOT_INVARIANTS`, those the scenario enables) through the
    invariant registry, and ``durable_success``."""
    if "error" in result:
        return [Violation("recovers", f"the state could not be built: {result['error']}")]
    if "mount_error" in result:
        return [Violation("recovers", f"the root file system does not mount: {result['mount_error']}")]
    if oracle.system != "reference":
        return _judge_system(result["system_state"], oracle, after_return)
    violations: list[Violation] = []
    violations += _recovers(result["recovery"], "the recovery verb")
    if "read_error" in result:
        return violations + [Violation("recovers", f"the recovered file system cannot be read: "
                                                   f"{result['read_error']}")]
    ctx = CheckContext(Observation(**result["observation"]), [oracle.old, oracle.new], oracle.baseline)
    for name in ROOT_INVARIANTS:
        if name in oracle.invariants:
            violations += [Violation(name, problem) for problem in INVARIANTS[name].check(ctx).problems]
    matched = ctx.matched if "atomic_usr" in oracle.invariants else inv.atomic_usr(ctx.obs, ctx.acceptable)[1]
    if after_return and oracle.succeeded and matched is not oracle.new:
        what = f"the old tree {oracle.old.label}" if matched is oracle.old else "neither tree"
        violations.append(Violation("durable_success", f"the operation had reported success (exit 0), but after "
                                                       f"the cut /usr is {what}"))
    return violations


def _judge_system(observed: dict, oracle: Oracle, after_return: bool) -> list[Violation]:
    """A real system's state (``lab.systems.crashcheck.observe_system``'s dict, or ``{"error"}`` when its
    commands could not run at all)."""
    from lab.systems.crashcheck import judge_system_state  # the adapters build on the lab's invariants
    if "error" in observed:
        return [Violation("recovers", f"{oracle.system}'s state could not be read: {observed['error']}")]
    violations = _recovers(observed.get("recovery") or {"exit": 0}, f"{oracle.system}'s recovery")
    return violations + judge_system_state(observed, oracle.old, oracle.new, succeeded=oracle.succeeded,
                                           after_return=after_return, enabled=oracle.invariants)


def _recovers(recovery: dict, what: str) -> list[Violation]:
    """``recovers`` when the recovery (``{"exit", "output"}``) failed, with its last line of output."""
    if recovery["exit"] == 0:
        return []
    last = (recovery["output"].strip().splitlines() or ["(no output)"])[-1]
    return [Violation("recovers", f"{what} exited {recovery['exit']}: {last}")]
