"""The crash engine's form of the scenario step ``power_loss``: ``{during: STEP, explore: true}`` runs STEP on
the recording VM target, then checks every crash state the power-loss model allows during it
(``lab.crash.explore``).  The step class and its arguments are in ``lab/steps/system.py`` (``PowerLoss``).

Optional keys: ``model`` (volatile-cache | optimistic), ``granularity`` (request | sector), ``max_states``,
``seed`` (the sample's seed).  The live guest is not cut: the scenario continues from the completed step, and
the exploration's distinct violations become the step's violations.  A real system (``system: nix|ostree``)
takes the same step through :meth:`lab.systems.run.SystemRunner.power_loss`, which explores with the same
engine and records the result with :func:`record_exploration`.
"""
from __future__ import annotations

from dataclasses import replace

from lab.crash.check import Oracle
from lab.crash.explore import ExploreOptions, explore
from lab.invariants import ExpectedTree, Violation
from lab.packages import expected_tree


def step_options(arg, defaults: ExploreOptions, overrides: dict | None = None) -> ExploreOptions:
    """``defaults``, then the step's own settings, then ``overrides`` (e.g. ``stonelab crash explore`` flags)."""
    own = {key: getattr(arg, key) for key in ("model", "granularity", "max_states", "seed")
           if getattr(arg, key, None) is not None}
    return replace(defaults, **{**own, **(overrides or {})})


def run_power_loss(runner, step, result) -> list[ExpectedTree]:
    """Run the step's transaction and explore it; the trees the live system may show now."""
    from lab.steps import StepFailure
    target = runner.target
    if getattr(target, "generation", None) is None:
        raise StepFailure("power_loss explore checks recorded writes: it needs the vm target (recording on)")
    inner = step.arg.during
    cmd = inner.spec.command(runner, inner.arg)
    old = runner.model.tree()
    outcome = runner.pm(cmd.verb, *cmd.rest)
    runner.record(result, cmd.text(), outcome)
    start, end = target.marks[-2], target.marks[-1]
    new = expected_tree(list((cmd.after or {}).values()))
    oracle = Oracle(old, ExpectedTree("new " + new.label, new.files), outcome.ok, runner.baseline,
                    tuple(runner.scenario.invariants))
    recovery = ["state", "list", "-D", "{root}", "--mode", str(runner.scenario.mode),
                "--swap", str(runner.scenario.swap)]
    options = step_options(step.arg, runner.crash_defaults, runner.crash_overrides)
    exploration = explore(target, start.log_bytes, end.log_bytes, outcome.returncode, oracle, recovery, options)
    record_exploration(result, exploration)
    if outcome.ok and cmd.after is not None:
        runner.model.installed = cmd.after
    return [runner.model.tree()]


def record_exploration(result, exploration) -> None:
    """An exploration into the step's result (any system): the crash-state section, status ``explored``, and
    each distinct violation with its smallest state."""
    result.crash = exploration.to_dict()
    result.status = "explored"
    result.note = exploration.summary()
    result.violations += [
        Violation(v.invariant, f"{v.detail} [{v.states} state(s); smallest: flush boundary at entry {v.boundary}, "
                               f"cut at {v.cut}, write set {v.write_set}"
                               f"{', after the command returned' if v.after_return else ''}]")
        for v in exploration.violations]
