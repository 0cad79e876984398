"""Run a scenario against a system under test through the :mod:`lab.systems` interface.

The scenario's steps become the interface's operations (``install`` → install, ``remove`` → remove,
``activate: N`` → switch, ``activate: previous`` → rollback, ``prune: N`` → gc, ``verify`` → the system's own
check); after each step the lab reads the system's state and judges it: ``atomic_usr`` (the generation a boot
would use holds exactly one package set the lab created — the oracle is the packages' declared files, never the
system's own bookkeeping) and the system's structural invariants (:meth:`SystemUnderTest.invariants`).
A step kind or operation the system lacks is refused when the scenario is loaded (:func:`check_steps`).
"""
from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from collections.abc import Callable
from pathlib import Path

from lab import invariants as inv
from lab.crash.check import Oracle
from lab.crash.explore import ExploreOptions, explore
from lab.crash.step import record_exploration, step_options
from lab.invariants import ExpectedTree, Violation
from lab.packages import PackageDecl, expected_tree
from lab.probe import Observation
from lab.runner import ScenarioResult, StepResult, run_cache_dir
from lab.systems import make_system, operations_of, require
from lab.systems.base import Operation, SystemUnderTest, UnsupportedOperation
from lab.target import CommandResult

# the step kinds a real system takes (the others drive the reference's fault points, boot manager, ESP…)
SYSTEM_STEPS = ("install", "remove", "activate", "prune", "verify", "expect_usr", "expect_fail", "corrupt_store",
                "power_loss")
CUTTABLE = ("install", "remove", "prune")  # the operations that make or drop a generation (power_loss: during)


def operation_of(kind: str, arg: object) -> Operation | None:
    """The interface operation a step needs (None: the step needs none, e.g. ``expect_usr``)."""
    if kind == "activate":
        return Operation.ROLLBACK if arg == "previous" else Operation.SWITCH
    return {"install": Operation.INSTALL, "remove": Operation.REMOVE, "prune": Operation.GC,
            "verify": Operation.VERIFY}.get(kind)


def check_steps(system: str, target: str, steps: list, fail: Callable[[int, str], Exception]) -> None:
    """Raise ``fail(step index, problem)`` for the first step system ``system`` cannot run on ``target``
    (steps: objects with ``kind``, ``arg``, ``index``)."""
    for step in steps:
        kind, arg = step.kind, step.arg
        where = step.index
        if system == "reference":
            continue
        if kind == "power_loss":
            if not arg.explore:
                raise fail(where, f"power_loss on system {system!r} needs `explore: true` (the seeded `at: random` "
                                  "cut counts the reference's system calls)")
            if target != "vm":
                raise fail(where, "power_loss needs the vm target (target: vm): it explores recorded disk writes")
            if arg.during.kind not in CUTTABLE:
                raise fail(where, f"power_loss on system {system!r} explores an operation that makes or drops a "
                                  f"generation ({', '.join(CUTTABLE)}), not {arg.during.kind!r}")
            kind, arg = arg.during.kind, arg.during.arg
        if kind == "expect_fail":
            kind, arg = arg.kind, arg.arg
        if kind not in SYSTEM_STEPS:
            raise fail(where, f"step {kind!r} is for the reference implementation only; system {system!r} takes "
                              f"{', '.join(SYSTEM_STEPS)}")
        operation = operation_of(kind, arg)
        if operation is not None and operation not in operations_of(system):
            has = ", ".join(sorted(operations_of(system)))
            raise fail(where, f"system {system!r} has no {operation.value!r} operation (it has {has})")


class SystemRunner:
    """Runs steps on one system; keeps the lab's model: which package set each generation was made with."""

    def __init__(self, scenario, system: SystemUnderTest, crash_defaults=None, crash_overrides: dict | None = None):
        self.scenario = scenario
        self.system = system
        self.crash_defaults = crash_defaults or ExploreOptions()
        self.crash_overrides = crash_overrides
        self.installed: dict[str, PackageDecl] = {}
        self.by_ref: dict[str, dict[str, PackageDecl]] = {}

    def run_step(self, step) -> StepResult:
        started = time.monotonic()
        result = StepResult(step.index, step.describe(), "ok", 0.0)
        try:
            if step.kind == "expect_fail":
                outcome, _ = self._operate(step.arg)
                self._record(result, outcome)
                if outcome.ok:
                    raise _StepFailed(f"{step.arg.describe()} succeeded but was expected to fail")
                result.note = outcome.summary()
                acceptable = [self._tree(self.installed)]
            elif step.kind == "expect_usr":
                acceptable = [expected_tree([self.scenario.packages[k] for k in keys]) for keys in step.arg]
            elif step.kind == "power_loss":
                self.power_loss(step, result)
                result.seconds = time.monotonic() - started
                return result
            elif step.kind == "corrupt_store":
                result.note = f"overwrote the first byte of /{self.system.corrupt_store()}"
                acceptable = [self._tree(self.installed)]
            else:
                outcome, after = self._operate(step)
                self._record(result, outcome)
                if not outcome.ok:
                    raise _StepFailed(f"{result.command}: {outcome.summary()}")
                acceptable = self._after(after)
        except _StepFailed as err:
            result.status, result.note = "failed", str(err)
            acceptable = [self._tree(self.installed)]
        except UnsupportedOperation as err:
            result.status, result.note = "failed", str(err)
            acceptable = [self._tree(self.installed)]
        result.violations = self.check(acceptable, result)
        result.seconds = time.monotonic() - started
        return result

    def power_loss(self, step, result: StepResult) -> None:
        """``power_loss: {during: STEP, explore: true}``: settle the disk (``sync`` and a flushing fsync, so the
        state before the operation is durable and the exploration judges this operation alone), run the
        operation in the recording guest between two timeline marks, then check every crash state the
        power-loss model allows during it (:func:`lab.crash.explore.explore`, the engine the reference's
        ``power_loss`` uses) against the old and the new package set: ALICE's contract and the system's own
        invariants. The live guest is not cut; the scenario continues from the completed operation."""
        guest = self.system.guest
        old_installed = dict(self.installed)
        guest.settle()
        start = guest.mark("start")
        outcome, after = self._operate(step.arg.during)
        end = guest.mark("return", outcome.returncode)
        self._record(result, outcome)
        new = self._tree(after if after is not None else old_installed)
        oracle = Oracle(self._tree(old_installed), ExpectedTree("new " + new.label, new.files), outcome.ok, {},
                        tuple(self.scenario.invariants), str(self.scenario.system))
        options = step_options(step.arg, self.crash_defaults, self.crash_overrides)
        exploration = explore(guest, start.log_bytes, end.log_bytes, outcome.returncode, oracle, [], options,
                              system_root=str(self.system.root.relative_to(guest.root)))
        record_exploration(result, exploration)
        if outcome.ok and after is not None:
            self.installed = after
        current = self.system.state().current_generation()
        if outcome.ok and current is not None:
            self.by_ref[current.ref] = dict(self.installed)

    def _operate(self, step) -> tuple[CommandResult, dict[str, PackageDecl] | None]:
        """Run the step's operation; returns its result and the package set it should leave (None: the
        generation it switches to tells)."""
        operation = operation_of(step.kind, step.arg)
        if operation is None:
            raise _StepFailed(f"step {step.kind} is no operation")
        require(self.system, operation, f"steps[{step.index}]")
        after = dict(self.installed)
        if operation is Operation.INSTALL:
            added = [self.scenario.packages[k] for k in step.arg]
            after.update({d.name: d for d in added})
            return self.system.install(added, list(after.values())), after
        if operation is Operation.REMOVE:
            for name in step.arg:
                after.pop(str(name), None)
            return self.system.remove([str(n) for n in step.arg], list(after.values())), after
        if operation is Operation.SWITCH:
            return self.system.switch(int(step.arg)), None
        if operation is Operation.ROLLBACK:
            return self.system.rollback(), None
        if operation is Operation.GC:
            return self.system.gc(int(step.arg)), after
        return self.system.verify(), after

    def _after(self, after: dict[str, PackageDecl] | None) -> list[ExpectedTree]:
        if after is not None:
            self.installed = after
            return [self._tree(after)]
        current = self.system.state().current_generation()
        if current is None or current.ref not in self.by_ref:
            ref = current.ref if current else "none"
            return [ExpectedTree(f"a generation the lab created (current: {ref})", {"\0": ["unknown"]})]
        self.installed = dict(self.by_ref[current.ref])
        return [self._tree(self.installed)]

    def check(self, acceptable: list[ExpectedTree], result: StepResult) -> list[Violation]:
        """Judge the system now: the enabled invariants on its state against ``acceptable`` trees; the evidence of
        those that held goes to ``result``."""
        state = self.system.state()
        enabled = set(self.scenario.invariants)
        violations: list[Violation] = []
        current = state.current_generation()
        if "atomic_usr" in enabled:
            found, matched = inv.atomic_usr(Observation(usr=state.tree), acceptable)
            violations += found
            if matched is not None:
                result.evidence["atomic_usr"] = (f"generation {current.ref if current else '(none)'} holds exactly "
                                                 f"{matched.label}")
        violations += [v for v in self.system.invariants(state) if v.invariant in enabled]
        failed = {v.invariant for v in violations}
        result.evidence.update({name: text for name, text in self.system.evidence.items()
                                if name in enabled and name not in failed})
        if current is not None and not any(v.invariant == "atomic_usr" for v in violations):
            self.by_ref[current.ref] = dict(self.installed)
        return violations

    @staticmethod
    def _tree(installed: dict[str, PackageDecl]) -> ExpectedTree:
        return expected_tree(list(installed.values()))

    @staticmethod
    def _record(result: StepResult, outcome: CommandResult) -> None:
        result.command = " ".join(outcome.argv)
        result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]


class _StepFailed(Exception):
    pass


def run_system_steps(scenario, result: ScenarioResult, kind: str, workdir: Path | None, crash_defaults=None,
                     crash_overrides: dict | None = None) -> None:
    """Run the steps of ``scenario`` (a real system) into ``result``: on this machine in a temporary root, or on
    the vm target in a guest whose SUT disk has the scenario's ``filesystem`` (its writes recorded when a step
    explores crash states; ``crash_defaults``/``crash_overrides`` as for the reference's ``power_loss``). Raises
    StonelabError when the lab cannot set the system up (the caller's ``error`` verdict)."""
    kind = "vm" if str(kind) == "vm" else "host"
    result.crash_semantics = "no power cuts on the host target"
    if kind == "vm":
        workdir = workdir or run_cache_dir()  # the guest reads the source store/repository from there
    with tempfile.TemporaryDirectory(prefix="stonelab-sut-", dir=workdir) as tmp, ExitStack() as stack:
        system = _system_on(kind, scenario, Path(tmp), stack)
        if kind == "vm":
            result.crash_semantics = system.guest.crash_semantics
        try:
            system.prepare()
            result.environment = (system.guest.describe() if kind == "vm"
                                  else f"host, {scenario.system} on {system.root}")
            runner = SystemRunner(scenario, system, crash_defaults, crash_overrides)
            for step in scenario.steps:
                result.steps.append(runner.run_step(step))
                if result.steps[-1].status == "failed":
                    break
        finally:
            system.cleanup()


def _system_on(kind: str, scenario, tmp: Path, stack: ExitStack) -> SystemUnderTest:
    if kind == "host":
        return make_system(scenario.system, tmp / "root", tmp / "work")
    from lab.systems.guest import SystemGuest, guest_system
    explores = any(step.kind == "power_loss" for step in scenario.steps)
    guest = stack.enter_context(SystemGuest(tmp / "vm", filesystem=scenario.filesystem, record=explores))
    return guest_system(str(scenario.system), guest, tmp / "work")
