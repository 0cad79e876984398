"""Invariants: what an atomic, stateless system promises, judged on an Observation against the lab's oracle.

The oracle is independent of the system under test: the trees the lab expects are computed from the packages'
declared files, never from what the package manager wrote.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lab.probe import ROOT_LINKS, Observation

# Files the package manager itself writes into /usr, which no package declares.
SYSTEM_FILES = frozenset({"lib/os-release"})


@dataclass(frozen=True)
class ExpectedTree:
    label: str  # e.g. "state with hello-1"
    files: dict[str, list]  # rel path -> ["file", digest] | ["symlink", dest]


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


def _comparable(tree: dict[str, list]) -> dict[str, tuple]:
    # modes are the package manager's business (mode & ~0o222); content and link targets are the promise
    return {k: tuple(v[:2]) for k, v in tree.items() if k not in SYSTEM_FILES}


def tree_difference(observed: dict[str, list], expected: dict[str, list], limit: int = 3) -> str:
    seen, want = _comparable(observed), _comparable(expected)
    missing = sorted(set(want) - set(seen))
    extra = sorted(set(seen) - set(want))
    changed = sorted(k for k in set(seen) & set(want) if seen[k] != want[k])
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if items:
            shown = ", ".join("/usr/" + i for i in items[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {shown}{more}")
    return "; ".join(parts) or "identical"


def atomic_usr(obs: Observation, acceptable: list[ExpectedTree]) -> tuple[list[Violation], ExpectedTree | None]:
    """/usr is exactly one of the acceptable trees — never a mixture, never a partial tree."""
    observed = _comparable(obs.usr)
    for tree in acceptable:
        if observed == _comparable(tree.files):
            return [], tree
    closest = min(acceptable, key=lambda t: len(set(_comparable(t.files).items()) ^ set(observed.items())))
    return [Violation("atomic_usr", f"/usr matches none of: {', '.join(t.label for t in acceptable)} "
                                    f"(closest {closest.label}: {tree_difference(obs.usr, closest.files)})")], None


def staging_empty(obs: Observation) -> list[Violation]:
    if obs.staging:
        return [Violation("staging_empty", f"/.moss/root/staging holds {', '.join(obs.staging)} "
                                           "(upstream #576: the next activation fails)")]
    return []


def state_id_matches(obs: Observation) -> list[Violation]:
    if obs.state_id is None:
        return [Violation("state_id_matches", "/usr/.stateID is missing")] if obs.db_states else []
    if not obs.state_id.isdigit():
        return [Violation("state_id_matches", f"/usr/.stateID holds {obs.state_id!r}, not a state id")]
    if int(obs.state_id) not in obs.db_states:
        return [Violation("state_id_matches",
                          f"/usr/.stateID says {obs.state_id}, which the state database does not know "
                          f"(it has {obs.db_states or 'no states'})")]
    if obs.usr_is_symlink is not None:
        # symlink strategy: /usr must point at the active state's tree, which lives in /.moss/root/<id>/usr
        if obs.usr_is_symlink.rstrip("/").split("/")[-2:] != [obs.state_id, "usr"]:
            return [Violation("state_id_matches",
                              f"/usr points to {obs.usr_is_symlink} but its .stateID says {obs.state_id}")]
        return []
    if obs.state_id in obs.archived:
        return [Violation("state_id_matches", f"active state {obs.state_id} is also archived in /.moss/root")]
    return []


def stateless(obs: Observation, baseline: dict[str, list]) -> list[Violation]:
    """Outside /usr and /.moss only the root links may change, and they must point into /usr."""
    problems = []
    for name in ROOT_LINKS:
        value = obs.outside.get(name)
        if value is not None and baseline.get(name) != value and not (
                value[0] == "symlink" and value[1].lstrip("/").startswith("usr/")):
            problems.append(f"/{name} is {value}, not a link into /usr")
    changed = sorted(k for k in set(obs.outside) | set(baseline)
                     if k not in ROOT_LINKS and obs.outside.get(k) != baseline.get(k))
    if changed:
        problems.append("written outside /usr: " + ", ".join("/" + c for c in changed[:5]))
    return [Violation("stateless", p) for p in problems]


def store_integrity(obs: Observation) -> list[Violation]:
    problems = []
    if obs.bad_assets:
        problems.append(f"{len(obs.bad_assets)} asset(s) do not hash to their name: {obs.bad_assets[0]}")
    if obs.partial_assets:
        problems.append(f"{len(obs.partial_assets)} partial asset(s) left: {obs.partial_assets[0]}")
    return [Violation("store_integrity", p) for p in problems]


@dataclass
class CheckContext:
    """What an invariant may judge after a step: the observation, the trees the oracle accepts, the outside of
    /usr before the first step, and the target (for observations beyond ``obs``). ``matched`` is set by
    ``atomic_usr`` to the accepted tree /usr turned out to be."""

    obs: Observation
    acceptable: list[ExpectedTree]
    baseline: dict[str, list]
    target: object = None
    trace: Path | None = None  # strace of the step's transaction (the ALICE check)
    model_states: set[int] = field(default_factory=set)  # states the lab saw committed
    strict_boot: bool = True  # False right after a crash: the default may still be the previous state
    booted: tuple[str | None, str, str] | None = None  # after a `boot` step: (expected, reported state, entry)
    matched: ExpectedTree | None = None


@dataclass(frozen=True)
class Outcome:
    """One invariant on one observation: the problems found (none: it held) and the evidence either way."""

    problems: tuple[str, ...]
    evidence: str

    @property
    def held(self) -> bool:
        return not self.problems


class Invariant:
    """Base of every invariant: ``name``, ``summary`` and :meth:`check`. Registered with :func:`register`."""

    name: str
    summary: str

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        raise NotImplementedError

    @classmethod
    def _from(cls, violations: list[Violation], evidence: str) -> Outcome:
        return Outcome(tuple(v.detail for v in violations), evidence)


INVARIANTS: dict[str, type[Invariant]] = {}

#: Invariants judged on materialised crash states only (lab/crash/check.py), never on a live observation:
#: name -> what it promises. A scenario may name them in ``invariants`` and ``expect_violations``.
CRASH_STATE_INVARIANTS = {
    "recovers": "a crash state mounts (journal replay included) and the system's recovery succeeds (the reference's "
                "recovery verb; a real system's own recovery and the commands that read its state)",
    "durable_success": "an operation that reported success (exit 0) before the cut survives it (ALICE)",
}


def register(cls: type[Invariant]) -> type[Invariant]:
    """Class decorator: make ``cls`` the invariant called ``cls.name``."""
    if cls.name in INVARIANTS:
        raise ValueError(f"invariant {cls.name!r} registered twice")
    INVARIANTS[cls.name] = cls
    return cls


@register
class AtomicUsr(Invariant):
    name = "atomic_usr"
    summary = "/usr is exactly one of the trees the lab's oracle accepts (old or new), never a mixture"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        found, ctx.matched = atomic_usr(ctx.obs, ctx.acceptable)
        files = len(_comparable(ctx.obs.usr))
        return cls._from(found, f"/usr ({files} entries) is {ctx.matched.label}" if ctx.matched else "")


@register
class StagingEmpty(Invariant):
    name = "staging_empty"
    summary = "nothing is left in /.moss/root/staging after a verb returns (upstream #576)"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        return cls._from(staging_empty(ctx.obs), "/.moss/root/staging is empty")


@register
class StateIdMatches(Invariant):
    name = "state_id_matches"
    summary = "/usr/.stateID names a state the database knows, and the swap layout agrees with it"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        obs = ctx.obs
        return cls._from(state_id_matches(obs),
                         f"/usr/.stateID {obs.state_id or '(none)'}; database states {obs.db_states or 'none'}")


@register
class Stateless(Invariant):
    name = "stateless"
    summary = "outside /usr and /.moss nothing changes but the root links, which point into /usr"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        return cls._from(stateless(ctx.obs, ctx.baseline),
                         f"{len(ctx.obs.outside)} entries outside /usr unchanged or links into /usr")


@register
class StoreIntegrity(Invariant):
    name = "store_integrity"
    summary = "every asset hashes to its name and no partial asset is left"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        found = store_integrity(ctx.obs)
        if ctx.obs.missing_assets:
            found.append(Violation(cls.name, f"{len(ctx.obs.missing_assets)} asset(s) the states' layouts reference "
                                             f"are missing from the store: {ctx.obs.missing_assets[0]}"))
        return cls._from(found, f"{ctx.obs.assets} assets hash to their names; every referenced asset present")


@register
class UsrIsOneState(Invariant):
    name = "usr_is_one_state"
    summary = ("/usr is exactly the tree the state database records for the active state (its packages' layout "
               "rows, hashes included), and every empty file is its own inode (upstream #372)")

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        obs = ctx.obs
        problems = []
        if obs.recorded_usr is None:
            if obs.db_states:
                problems.append(f"/usr/.stateID is {obs.state_id!r}: no recorded state to compare /usr with")
            evidence = "no state recorded yet"
        else:
            seen, want = _comparable(obs.usr), _comparable(obs.recorded_usr)
            if seen != want:
                problems.append(f"/usr differs from what the database records for state {obs.state_id}: "
                                f"{tree_difference(obs.usr, obs.recorded_usr)}")
            modes = sorted(k for k, v in obs.recorded_usr.items() if v[0] == "file" and k in obs.usr
                           and len(obs.usr[k]) > 2 and obs.usr[k][2] != v[2])
            if modes:
                problems.append(f"{len(modes)} file(s) with another mode than recorded (a shared inode keeps one "
                                f"mode; upstream #834): /usr/{modes[0]} is {obs.usr[modes[0]][2]}, recorded "
                                f"{obs.recorded_usr[modes[0]][2]}")
            owners = sorted(k for k, v in obs.recorded_usr.items() if v[0] == "file" and len(v) > 3
                            and len(obs.usr.get(k, ())) > 3 and obs.usr[k][3] != v[3])
            if owners:
                problems.append(f"{len(owners)} file(s) owned otherwise than recorded (uid:gid; a hard link keeps "
                                f"the store's owner: upstream #785): /usr/{owners[0]} is {obs.usr[owners[0]][3]}, "
                                f"recorded {obs.recorded_usr[owners[0]][3]}")
            evidence = (f"/usr matches the {len(want)} layout rows recorded for state {obs.state_id} "
                        "(content, link targets, modes, owners)")
        if obs.shared_empty_files:
            problems.append(f"{len(obs.shared_empty_files)} empty file(s) share an inode (hard-linked; upstream "
                            f"#372 EMLINK): /usr/{obs.shared_empty_files[0]}")
        return Outcome(tuple(problems), evidence)


@register
class NoOrphanStates(Invariant):
    name = "no_orphan_states"
    summary = "every state row has a tree (active /usr or /.moss/root/<id>/usr) and every tree has a row"

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        obs = ctx.obs
        active = obs.state_id if obs.state_id and obs.state_id.isdigit() else None
        treeless = [s for s in obs.db_states if str(s) != active and str(s) not in obs.archived]
        rowless = [a for a in obs.archived if int(a) not in obs.db_states]
        problems = []
        if treeless:
            problems.append(f"state(s) {', '.join(map(str, treeless))} recorded in the database but without a tree "
                            "(activating them fails; moss-compat crash after state.recorded)")
        if rowless:
            problems.append(f"tree(s) /.moss/root/{', '.join(rowless)} without a state row")
        return Outcome(tuple(problems), f"states {obs.db_states or 'none'}: active {active}, "
                                        f"archived trees {obs.archived or 'none'}")


# Invariants defined in their own modules (imported for their registrations).
from lab import boot_invariants as _boot_invariants  # noqa: E402,F401
from lab import alice as _alice  # noqa: E402,F401
