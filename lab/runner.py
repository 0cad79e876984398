"""Run scenarios: each step through the target (its kind's class in :mod:`lab.steps`), then every enabled
invariant (:data:`lab.invariants.INVARIANTS`) on what the target observes.

A scenario passes when its steps behave and the invariants it violates are exactly the ones it declares in
``expect_violations`` — so a scenario written to show an upstream flaw (moss-compat mode) fails the day the lab
stops catching that flaw, and a reference-mode scenario fails the day the reference implementation regresses.

Two kinds of failure are kept apart: the system under test failing (verdict ``fail``) and the lab itself breaking
(verdict ``error``, with the traceback in the result) — an unexpected exception in one scenario never ends a run.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.crash.model import Model
from lab.invariants import INVARIANTS, CheckContext, ExpectedTree, Violation
from lab.packages import PackageDecl, build_packages, expected_tree
from lab.scenario import Scenario
from lab.steps import Step, StepFailure
from lab.steps.faults import Interrupted
from lab.target import CommandResult, HostTarget, Target, TargetKind
from lab.verdict import Verdict
from reference_impl.transaction import Mode
from stonelab.errors import StonelabError

__all__ = ["Runner", "ScenarioResult", "StepFailure", "StepResult", "run_scenario", "run_cache_dir"]


@dataclass
class StepResult:
    index: int
    description: str
    status: str  # ok | failed | crashed | explored
    seconds: float
    command: str = ""
    output: str = ""
    note: str = ""
    violations: list[Violation] = field(default_factory=list)
    evidence: dict[str, str] = field(default_factory=dict)  # invariant -> what showed it held
    crash: dict | None = None  # a power_loss explore step's crash states (lab.crash.explore.Exploration)


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
    steps: list[StepResult] = field(default_factory=list)
    expected_violations: list[str] = field(default_factory=list)
    verdict: Verdict = Verdict.PASS
    reason: str = ""
    seconds: float = 0.0
    upstream: str = ""
    traceback: str = ""  # set when the lab itself broke (verdict error)
    console: str = ""    # the guest's serial console (VM target), for the report's excerpt
    sections: list[dict] = field(default_factory=list)  # extra evidence for the report: {kind, title, data}
    system: str = "reference"  # the system under test (lab.systems.SystemName)

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


class Runner:
    """Runs one scenario's steps on one target; what step classes use: ``pm``, ``record``, ``model``,
    ``interrupt``/``interrupted``, ``resolve_state``, ``target``, ``scenario``, ``packages``."""

    def __init__(self, scenario: Scenario, target: Target, packages: dict[str, Path], workdir: Path, *,
                 crash_defaults=None, crash_overrides: dict | None = None):
        from lab.crash.explore import ExploreOptions
        self.crash_defaults = crash_defaults or ExploreOptions()  # power_loss explore: the run's settings
        self.crash_overrides = crash_overrides or {}  # ... and the command line's, which win over the step's
        self.scenario = scenario
        self.target = target
        self.packages = packages
        self.workdir = workdir
        self.traces = 0
        self.last_trace: Path | None = None
        self.booted: tuple[str | None, str, str] | None = None  # (expected state, reported state, entry)
        self.model = _Model()
        self.baseline = target.observe().outside
        self.interrupted: Interrupted | None = None

    def pm_args(self, verb: list[str], *rest: str) -> list[str]:
        """Arguments of one verb on the target's root, in the scenario's mode and swap strategy (with the
        system disk's ESP when the scenario manages boot entries)."""
        boot = self.target.boot_args() if self.scenario.esp else []
        return [*verb, "-D", str(self.target.root), "--mode", str(self.scenario.mode),
                "--swap", str(self.scenario.swap), *boot, *rest]

    def pm(self, verb: list[str], *rest: str, fault: str | None = None,
           env: dict[str, str] | None = None, cut_model: Model | None = None) -> CommandResult:
        """The package manager's CLI; its system calls are traced for the ALICE check when that is enabled;
        ``cut_model``: what a power cut during it loses (default: the target's model)."""
        trace = None
        if "alice" in self.scenario.invariants and verb[0] in ("install", "remove", "sync", "state"):
            self.traces += 1
            trace = self.workdir / f"trace-{self.traces}.txt"
            self.last_trace = trace
        return self.target.stonelab(self.pm_args(verb, *rest), fault=fault, env=env, trace=trace,
                                    cut_model=cut_model)

    def execute(self, cmd) -> CommandResult:
        """A step's :class:`lab.steps.transactions.Command` on the target."""
        if cmd.plain:
            return self.target.stonelab([*cmd.verb, *cmd.rest])
        return self.pm(cmd.verb, *cmd.rest)

    @staticmethod
    def record(result: StepResult, command: str, outcome: CommandResult) -> None:
        result.command = command
        result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]

    def interrupt(self, after: dict[str, PackageDecl] | None) -> None:
        """A transaction died; ``after`` is the package set it would have left."""
        new = expected_tree(list((after or {}).values()))
        self.interrupted = Interrupted(self.model.tree(), ExpectedTree("new " + new.label, new.files), after or {})

    def resolve_state(self, arg: object) -> int:
        if isinstance(arg, int):
            return arg
        obs = self.target.observe()
        active = int(obs.state_id) if obs.state_id and obs.state_id.isdigit() else None
        older = [s for s in obs.db_states if active is not None and s < active and s in self.model.states]
        if not older:
            raise StepFailure(f"no state before the active one ({active}) to activate")
        return max(older)

    def run_step(self, step: Step) -> StepResult:
        started = time.monotonic()
        result = StepResult(step.index, step.describe(), "ok", 0.0)
        spec = step.spec
        try:
            acceptable = spec.run(self, step, result)
        except StepFailure as err:
            result.status = "failed"
            result.note = str(err)
            acceptable = self.interrupted.trees() if self.interrupted else [self.model.tree()]
        if spec.checked:
            self._check(step, result, acceptable)
            self.interrupted = None
        elif result.status == "crashed" and self.scenario.esp and "boot_entries_valid" in self.scenario.invariants:
            self._check(step, result, acceptable, only=("boot_entries_valid",))  # what the firmware finds next
        result.seconds = time.monotonic() - started
        return result

    def _check(self, step: Step, result: StepResult, acceptable: list[ExpectedTree],
               only: tuple[str, ...] = ()) -> None:
        # "the default boots the active state" is the promise of a boot sync: judged when one was due
        strict_boot = not only and (self.scenario.esp or step.kind == "boot_sync")
        ctx = CheckContext(self.target.observe(boot=self.scenario.uses_esp), acceptable, self.baseline,
                           self.target, trace=self.last_trace, model_states=set(self.model.states),
                           strict_boot=strict_boot, booted=self.booted)
        self.last_trace = None
        self.booted = None
        for name in only or self.scenario.invariants:
            if name not in INVARIANTS:
                continue  # judged on crash states only (lab.crash.check.CRASH_INVARIANTS)
            outcome = INVARIANTS[name].check(ctx)
            if outcome.held:
                result.evidence[name] = outcome.evidence
            result.violations += [Violation(name, p) for p in outcome.problems]
        if only:
            return
        if self.interrupted and ctx.matched is self.interrupted.new:
            self.model.installed = self.interrupted.new_installed
        obs = ctx.obs
        if obs.state_id and obs.state_id.isdigit() and not any(v.invariant == "atomic_usr" for v in result.violations):
            self.model.states[int(obs.state_id)] = dict(self.model.installed)


TargetFactory = Callable[[Path], Target]


StepHook = Callable[[int, str], None]


def run_scenario(scenario: Scenario, *, workdir: Path | None = None, target: str | None = None,
                 vm_factory: TargetFactory | None = None, crash_defaults=None,
                 crash_overrides: dict | None = None, on_step: StepHook | None = None) -> ScenarioResult:
    """Run one scenario: where it is pinned (``target: host|vm`` in its file), else on ``target`` (default host).

    Never raises for a failure of the system under test (verdict ``fail``) nor for a broken lab (verdict
    ``error``: a StonelabError's message, or any other exception with its traceback); only KeyboardInterrupt
    and SystemExit pass through. ``on_step(index, description)`` is called before each step (live progress).
    """
    started = time.monotonic()
    kind = TargetKind(scenario.target if scenario.target != TargetKind.ANY else (target or TargetKind.HOST))
    result = ScenarioResult(scenario.name, str(scenario.path), scenario.description, str(kind),
                            str(scenario.mode), str(scenario.swap), "",
                            expected_violations=sorted(scenario.expected_for(kind)), upstream=scenario.upstream,
                            system=str(scenario.system))
    if scenario.not_applicable:
        result.verdict, result.reason = Verdict.NOT_APPLICABLE, scenario.not_applicable
        return result
    try:
        if scenario.system != "reference":
            from lab.systems.run import run_system_steps  # a real system: lab.systems builds on this module
            run_system_steps(scenario, result, kind, workdir, crash_defaults, crash_overrides)
        else:
            _run_steps(scenario, result, kind, workdir, vm_factory,
                       {"crash_defaults": crash_defaults, "crash_overrides": crash_overrides}, on_step)
    except StepFailure as err:  # the system left its root unreadable (a damaged filesystem): a verdict
        result.verdict, result.reason = Verdict.FAIL, str(err)
    except StonelabError as err:
        result.verdict, result.reason = Verdict.ERROR, f"lab error: {err}"
    except Exception as err:  # a bug in the lab: report it, keep running the other scenarios
        result.verdict, result.reason = Verdict.ERROR, f"lab error: {type(err).__name__}: {err}"
        result.traceback = traceback.format_exc()
    else:
        judge(result)
    result.seconds = time.monotonic() - started
    return result


def _run_steps(scenario: Scenario, result: ScenarioResult, kind: TargetKind, workdir: Path | None,
               vm_factory: TargetFactory | None, crash: dict, on_step: StepHook | None = None) -> None:
    if kind == TargetKind.VM and vm_factory is None:
        from lab.vm_target import vm_target_factory
        vm_factory = vm_target_factory()
    if kind == TargetKind.VM:
        workdir = workdir or run_cache_dir()  # must be visible in the guest, which mounts tmpfs over /tmp
    with tempfile.TemporaryDirectory(prefix="stonelab-run-", dir=workdir) as tmp:
        packages, decls = build_packages(scenario.packages, Path(tmp) / "packages")
        scenario = dataclasses.replace(scenario, packages=decls)
        make = vm_factory if kind == TargetKind.VM else (lambda path: HostTarget(path))
        with make(Path(tmp) / "target") as sut:
            result.crash_semantics = sut.crash_semantics
            result.environment = sut.describe()
            runner = Runner(scenario, sut, packages, Path(tmp), **crash)
            try:
                for step in scenario.steps:
                    if on_step:
                        on_step(step.index, step.describe())
                    step_result = runner.run_step(step)
                    result.steps.append(step_result)
                    if step_result.status == "failed":
                        break
            finally:
                result.console = getattr(sut, "console_text", lambda: "")()


def run_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "stonelab" / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def judge(result: ScenarioResult) -> None:
    """The verdict: the steps behaved and the violations observed are exactly the expected ones; expected
    violations of upstream's sequence (moss-compat) or of a scenario naming an upstream report are an
    "upstream gap reproduced"."""
    failed = [s for s in result.steps if s.status == "failed"]
    observed, expected = set(result.observed_violations), set(result.expected_violations)
    if failed:
        result.verdict = Verdict.FAIL
        result.reason = f"step {failed[0].index} ({failed[0].description}): {failed[0].note}"
    elif observed - expected:
        first = next(v for s in result.steps for v in s.violations if v.invariant in observed - expected)
        result.verdict, result.reason = Verdict.FAIL, f"{first.invariant} violated: {first.detail}"
    elif expected - observed:
        result.verdict = Verdict.FAIL
        result.reason = f"expected to catch {', '.join(sorted(expected - observed))}, but it held"
    elif expected and (result.mode == Mode.MOSS_COMPAT or result.upstream):
        result.verdict = Verdict.PASS
        where = f" ({result.upstream})" if result.upstream else ""
        result.reason = f"upstream gap reproduced{where}: caught {', '.join(sorted(expected))}"
    else:
        result.verdict = Verdict.PASS
        result.reason = ("caught as expected: " + ", ".join(sorted(expected))) if expected else "all invariants held"
