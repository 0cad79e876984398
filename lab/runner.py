"""Run scenarios: each step through the target, then every invariant on what the target observes.

A scenario passes when its steps behave and the invariants it violates are exactly the ones it declares in
``expect_violations`` — so a scenario written to show an upstream flaw (moss-compat mode) fails the day the lab
stops catching that flaw, and a reference-mode scenario fails the day the reference implementation regresses.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab import invariants as inv
from lab.invariants import ExpectedTree, Violation
from lab.packages import build_packages, expected_tree
from lab.scenario import PackageDecl, Scenario, Step
from lab.target import CommandResult, HostTarget, Target
from stonelab.errors import StonelabError


@dataclass
class StepResult:
    index: int
    description: str
    status: str  # ok | failed | crashed
    seconds: float
    command: str = ""
    output: str = ""
    note: str = ""
    violations: list[Violation] = field(default_factory=list)


@dataclass
class ScenarioResult:
    name: str
    path: str
    description: str
    target: str
    mode: str
    swap: str
    crash_semantics: str
    environment: str = ""
    system: str = "reference"  # the system under test (lab.systems.SYSTEMS)
    upstream: str = ""  # the upstream report(s) the expected violations reproduce
    steps: list[StepResult] = field(default_factory=list)
    expected_violations: list[str] = field(default_factory=list)
    verdict: str = "pass"  # pass | fail | error
    reason: str = ""
    seconds: float = 0.0

    @property
    def observed_violations(self) -> list[str]:
        return sorted({v.invariant for s in self.steps for v in s.violations})


@dataclass
class _Model:
    """What the lab believes the system holds, from the packages alone."""

    installed: dict[str, PackageDecl] = field(default_factory=dict)
    states: dict[int, dict[str, PackageDecl]] = field(default_factory=dict)

    def tree(self) -> ExpectedTree:
        return expected_tree(list(self.installed.values()))


@dataclass
class _Interrupted:
    """A transaction that died: recovery may leave the old tree or the new one, nothing else."""

    old: ExpectedTree
    new: ExpectedTree
    new_installed: dict[str, PackageDecl]

    def trees(self) -> list[ExpectedTree]:
        return [self.old, self.new]


class StepFailure(Exception):
    pass


class Runner:
    def __init__(self, scenario: Scenario, target: Target, packages: dict[str, Path]):
        self.scenario = scenario
        self.target = target
        self.packages = packages
        self.model = _Model()
        self.baseline = target.observe().outside
        self.interrupted: _Interrupted | None = None

    # --- commands ---------------------------------------------------------------------------------------
    def pm(self, verb: list[str], *rest: str, fault: str | None = None) -> CommandResult:
        args = [*verb, "-D", str(self.target.root), "--mode", self.scenario.mode, "--swap", self.scenario.swap,
                *rest]
        return self.target.stonelab(args, fault=fault)

    def command_for(self, step: Step) -> tuple[list[str], list[str], dict[str, PackageDecl] | None]:
        """argv pieces and the package set the step should leave when it succeeds."""
        after = dict(self.model.installed)
        if step.kind == "install":
            decls = [self.scenario.packages[k] for k in step.arg]
            for decl in decls:
                after[decl.name] = decl
            return ["install"], [self.target.path_for_package(self.packages[k]) for k in step.arg], after
        if step.kind == "remove":
            for name in step.arg:
                after.pop(str(name), None)
            return ["remove"], [str(n) for n in step.arg], after
        if step.kind == "activate":
            state = self._resolve_state(step.arg)
            return ["state", "activate"], [str(state)], dict(self.model.states.get(state, {}))
        if step.kind == "prune":
            return ["state", "prune"], ["--keep", str(step.arg)], after
        if step.kind == "verify":
            return ["state", "verify"], [], after
        if step.kind == "recover":
            return ["state", "list"], [], None
        raise StepFailure(f"step {step.kind} has no command")

    def _resolve_state(self, arg: object) -> int:
        if isinstance(arg, int):
            return arg
        obs = self.target.observe()
        active = int(obs.state_id) if obs.state_id and obs.state_id.isdigit() else None
        older = [s for s in obs.db_states if active is not None and s < active and s in self.model.states]
        if not older:
            raise StepFailure(f"no state before the active one ({active}) to activate")
        return max(older)

    # --- steps ------------------------------------------------------------------------------------------
    def run_step(self, step: Step) -> StepResult:
        started = time.monotonic()
        result = StepResult(step.index, step.describe(), "ok", 0.0)
        acceptable: list[ExpectedTree]
        try:
            if step.kind == "crash":
                acceptable = self._crash(step, result)
            elif step.kind == "expect_fail":
                acceptable = self._expect_fail(step.arg, result)
            elif step.kind == "corrupt_store":
                result.note = f"overwrote the first byte of /{self.target.corrupt_asset()}"
                acceptable = [self.model.tree()]
            elif step.kind == "expect_usr":
                options = [expected_tree([self.scenario.packages[k] for k in keys]) for keys in step.arg]
                acceptable = options
            else:
                acceptable = self._transaction(step, result)
        except StepFailure as err:
            result.status = "failed"
            result.note = str(err)
            acceptable = [self.model.tree()]
        if step.kind != "crash":
            self._check(result, acceptable)
            self.interrupted = None
        result.seconds = time.monotonic() - started
        return result

    def _transaction(self, step: Step, result: StepResult) -> list[ExpectedTree]:
        verb, rest, after = self.command_for(step)
        outcome = self.pm(verb, *rest)
        result.command = " ".join(["stonelab", *verb, *rest])
        result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]
        if step.kind == "recover":
            return self.interrupted.trees() if self.interrupted else [self.model.tree()]
        if not outcome.ok:
            raise StepFailure(f"{result.command}: {outcome.summary()}")
        if after is not None:
            self.model.installed = after
        return [self.model.tree()]

    def _crash(self, step: Step, result: StepResult) -> list[ExpectedTree]:
        point, inner = step.arg["at"], step.arg["during"]
        verb, rest, after = self.command_for(inner)
        outcome = self.pm(verb, *rest, fault=point)
        result.command = f"STONELAB_FAULT={point}:crash stonelab {' '.join([*verb, *rest])}"
        result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]
        if not outcome.crashed:
            raise StepFailure(f"fault point {point} was not reached ({outcome.summary()})")
        result.status = "crashed"
        result.note = self.target.crash_semantics
        new = expected_tree(list((after or {}).values()))
        self.interrupted = _Interrupted(self.model.tree(), ExpectedTree("new " + new.label, new.files), after or {})
        return self.interrupted.trees()

    def _expect_fail(self, inner: Step, result: StepResult) -> list[ExpectedTree]:
        verb, rest, _after = self.command_for(inner)
        outcome = self.pm(verb, *rest)
        result.command = "stonelab " + " ".join([*verb, *rest])
        result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]
        lines = outcome.stderr.strip().splitlines()
        if outcome.ok:
            raise StepFailure(f"{result.command} succeeded but was expected to fail")
        if "Traceback" in outcome.stderr or len(lines) != 1:
            raise StepFailure(f"{result.command} failed without a one-line error ({len(lines)} lines)")
        result.note = lines[0]
        return [self.model.tree()]

    # --- invariants -------------------------------------------------------------------------------------
    def _check(self, result: StepResult, acceptable: list[ExpectedTree]) -> None:
        obs = self.target.observe()
        enabled = set(self.scenario.invariants)
        violations: list[Violation] = []
        if "atomic_usr" in enabled:
            found, matched = inv.atomic_usr(obs, acceptable)
            violations += found
            if self.interrupted and matched is self.interrupted.new:
                self.model.installed = self.interrupted.new_installed
        if "staging_empty" in enabled:
            violations += inv.staging_empty(obs)
        if "state_id_matches" in enabled:
            violations += inv.state_id_matches(obs)
        if "stateless" in enabled:
            violations += inv.stateless(obs, self.baseline)
        if "store_integrity" in enabled:
            violations += inv.store_integrity(obs)
        result.violations = violations
        if obs.state_id and obs.state_id.isdigit() and not any(v.invariant == "atomic_usr" for v in violations):
            self.model.states[int(obs.state_id)] = dict(self.model.installed)


TargetFactory = Callable[[Path], Target]


def run_scenario(scenario: Scenario, *, workdir: Path | None = None, target: str | None = None,
                 vm_factory: TargetFactory | None = None) -> ScenarioResult:
    """Run one scenario: where it is pinned (``target: host|vm`` in its file), else on ``target`` (default host)."""
    if scenario.system != "reference":
        from lab.systems.run import run_system_scenario
        return run_system_scenario(scenario, workdir=workdir)
    started = time.monotonic()
    kind = scenario.target if scenario.target != "any" else (target or "host")
    result = ScenarioResult(scenario.name, str(scenario.path), scenario.description, kind,
                            scenario.mode, scenario.swap, "", expected_violations=sorted(scenario.expected_for(kind)),
                            upstream=scenario.upstream)
    if kind == "vm" and vm_factory is None:
        from lab.vm_target import vm_target_factory
        vm_factory = vm_target_factory()
    if kind == "vm":
        workdir = workdir or run_cache_dir()  # must be visible in the guest, which mounts tmpfs over /tmp
    try:
        with tempfile.TemporaryDirectory(prefix="stonelab-run-", dir=workdir) as tmp:
            packages = build_packages(scenario.packages, Path(tmp) / "packages")
            make = vm_factory if kind == "vm" else (lambda path: HostTarget(path))
            with make(Path(tmp) / "target") as sut:
                result.crash_semantics = sut.crash_semantics
                result.environment = sut.describe()
                runner = Runner(scenario, sut, packages)
                for step in scenario.steps:
                    step_result = runner.run_step(step)
                    result.steps.append(step_result)
                    if step_result.status == "failed":
                        break
    except StonelabError as err:
        result.verdict, result.reason = "error", str(err)
        result.seconds = time.monotonic() - started
        return result
    result.seconds = time.monotonic() - started
    judge(result)
    return result


def run_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "stonelab" / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def judge(result: ScenarioResult) -> None:
    """Set the verdict: steps behaved and the violations observed are exactly the expected ones."""
    failed = [s for s in result.steps if s.status == "failed"]
    observed, expected = set(result.observed_violations), set(result.expected_violations)
    if failed:
        result.verdict, result.reason = "fail", f"step {failed[0].index} ({failed[0].description}): {failed[0].note}"
    elif observed - expected:
        first = next(v for s in result.steps for v in s.violations if v.invariant in observed - expected)
        result.verdict, result.reason = "fail", f"{first.invariant} violated: {first.detail}"
    elif expected - observed:
        result.verdict = "fail"
        result.reason = f"expected to catch {', '.join(sorted(expected - observed))}, but it held"
    else:
        result.verdict = "pass"
        result.reason = ("caught as expected: " + ", ".join(sorted(expected))) if expected else "all invariants held"
        if expected and result.upstream:
            result.reason = f"upstream gap reproduced ({result.upstream}): {', '.join(sorted(expected))}"
