"""The scenario step ``power_loss: {during: STEP, explore: true}``: run STEP on the recording VM target, then
check every crash state the power-loss model allows during it (``lab.crash.explore``).

Optional keys override the run's defaults: ``model`` (volatile-cache | optimistic), ``granularity``
(request | sector), ``max_states``, ``seed``.  The live guest is not cut: the scenario continues from the
completed step, and the exploration's distinct violations become the step's violations.
"""
from __future__ import annotations

from dataclasses import replace

from lab.crash.check import Oracle
from lab.crash.explore import ExploreOptions, explore
from lab.crash.model import Granularity, Model
from lab.invariants import ExpectedTree, Violation
from lab.packages import expected_tree

STEP_OPTIONS = {"explore": bool, "model": Model, "granularity": Granularity, "max_states": int, "seed": int}


def step_options(arg: dict, defaults: ExploreOptions, overrides: dict | None = None) -> ExploreOptions:
    """``defaults``, then the step's own settings, then ``overrides`` (e.g. ``stonelab crash explore`` flags)."""
    changes = {key: STEP_OPTIONS[key](arg[key]) for key in ("model", "granularity", "max_states", "seed")
               if key in arg}
    return replace(defaults, **{**changes, **(overrides or {})})


def run_power_loss(runner, step, result, defaults: ExploreOptions, overrides: dict | None = None) -> tuple[list[ExpectedTree], list[Violation]]:
    """Run the step and explore it; (trees the live system may show now, the crash states' violations)."""
    from lab.runner import StepFailure
    target = runner.target
    if getattr(target, "generation", None) is None:
        raise StepFailure("power_loss explores recorded writes: it needs the vm target (with recording on)")
    inner = step.arg["during"]
    verb, rest, after = runner.command_for(inner)
    old = runner.model.tree()
    outcome = runner.pm(verb, *rest)
    result.command = "stonelab " + " ".join([*verb, *rest])
    result.output = (outcome.stdout + outcome.stderr).strip()[-2000:]
    start, end = target.marks[-2], target.marks[-1]
    new = expected_tree(list((after or {}).values()))
    oracle = Oracle(old, ExpectedTree("new " + new.label, new.files), outcome.ok, runner.baseline,
                    tuple(runner.scenario.invariants))
    recovery = ["state", "list", "-D", "{root}", "--mode", runner.scenario.mode, "--swap", runner.scenario.swap]
    options = step_options(step.arg, defaults, overrides)
    exploration = explore(target, start.log_bytes, end.log_bytes, outcome.returncode, oracle, recovery, options)
    result.crash = exploration.to_dict()
    result.status = "explored"
    result.note = exploration.summary()
    if outcome.ok and after is not None:
        runner.model.installed = after
    violations = [Violation(v.invariant, f"{v.detail} [{v.states} state(s); smallest: flush boundary at entry "
                                         f"{v.boundary}, cut at {v.cut}, write set {v.write_set}"
                                         f"{', after the command returned' if v.after_return else ''}]")
                  for v in exploration.violations]
    return [runner.model.tree()], violations
