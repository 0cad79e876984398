"""Judge one materialised crash state: the lab's invariants plus ALICE's contract for the operation under test.

*ALICE's contract* (Pillai et al., OSDI '14, "All File Systems Are Not Created Equal"): an operation that
reported success survives a crash; any other leaves the old state or the new one — never neither, never a mix.
Here: when the cut came after the command returned with exit 0, ``/usr`` must be the new tree
(``durable_success``); otherwise it must be the old or the new tree (``atomic_usr``).  The other invariants are
the lab's usual ones (``lab/invariants.py``): ``state_id_matches``, ``staging_empty``, ``stateless``,
``store_integrity``; ``recovers`` fails when the file system does not mount or the recovery verb fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lab import invariants as inv
from lab.invariants import CRASH_STATE_INVARIANTS, INVARIANTS
from lab.invariants import ExpectedTree, Violation
from lab.probe import Observation

CRASH_INVARIANTS = tuple(CRASH_STATE_INVARIANTS)


@dataclass(frozen=True)
class Oracle:
    """What the lab knows independently of the system under test: the tree before the operation (``old``), the
    tree it promised (``new``), whether it reported success, the files outside /usr before the run."""

    old: ExpectedTree
    new: ExpectedTree
    succeeded: bool
    baseline: dict[str, list] = field(default_factory=dict)
    invariants: tuple[str, ...] = tuple(INVARIANTS)

    def to_dict(self) -> dict:
        return {"old": {"label": self.old.label, "files": self.old.files},
                "new": {"label": self.new.label, "files": self.new.files},
                "succeeded": self.succeeded, "baseline": self.baseline, "invariants": list(self.invariants)}

    @classmethod
    def from_dict(cls, data: dict) -> Oracle:
        return cls(ExpectedTree(**data["old"]), ExpectedTree(**data["new"]), bool(data["succeeded"]),
                   dict(data.get("baseline") or {}), tuple(data.get("invariants") or ()))


def judge(result: dict, oracle: Oracle, after_return: bool) -> list[Violation]:
    """Violations of one state from the guest's result (``mount_error`` | ``recovery`` + ``observation``)."""
    if "error" in result:
        return [Violation("recovers", f"the state could not be built: {result['error']}")]
    if "mount_error" in result:
        return [Violation("recovers", f"the root file system does not mount: {result['mount_error']}")]
    enabled = set(oracle.invariants) | set(CRASH_INVARIANTS)
    violations: list[Violation] = []
    recovery = result["recovery"]
    if recovery["exit"] != 0:
        last = (recovery["output"].strip().splitlines() or ["(no output)"])[-1]
        violations.append(Violation("recovers", f"the recovery verb exited {recovery['exit']}: {last}"))
    obs = Observation(**result["observation"])
    promised = after_return and oracle.succeeded
    found, matched = inv.atomic_usr(obs, [oracle.old, oracle.new])
    if "atomic_usr" in enabled:
        violations += found
    if promised and matched is not oracle.new and "durable_success" in enabled:
        what = f"the old tree {oracle.old.label}" if matched is oracle.old else "neither tree"
        violations.append(Violation("durable_success", f"the operation had reported success (exit 0), but after "
                                                       f"the cut /usr is {what}"))
    if "staging_empty" in enabled:
        violations += inv.staging_empty(obs)
    if "state_id_matches" in enabled:
        violations += inv.state_id_matches(obs)
    if "stateless" in enabled and oracle.baseline:
        violations += inv.stateless(obs, oracle.baseline)
    if "store_integrity" in enabled:
        violations += inv.store_integrity(obs)
    return violations
