"""Steps that run one verb of the package manager under test: install, remove, activate, prune, verify, recover."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from lab.steps import ParseContext, Step, StepFailure, StepKind, check_package_keys, register


@dataclass(frozen=True)
class Command:
    """argv pieces of one verb and the package set (name -> declaration) it leaves when it succeeds."""

    verb: list[str]
    rest: list[str]
    after: dict[str, Any] | None
    plain: bool = False  # a command of its own, without the installation options (-D, --mode, --swap)

    def text(self) -> str:
        return " ".join(["stonelab", *self.verb, *self.rest])


class TransactionStep(StepKind):
    """A verb of the package manager; ``command`` says which, :meth:`run` runs it and checks its exit status."""

    transaction = True

    @classmethod
    def command(cls, runner, arg: Any) -> Command:
        raise NotImplementedError

    @classmethod
    def run(cls, runner, step: Step, result) -> list:
        cmd = cls.command(runner, step.arg)
        outcome = runner.execute(cmd)
        runner.record(result, cmd.text(), outcome)
        if not outcome.ok:
            raise StepFailure(f"{cmd.text()}: {outcome.summary()}")
        if cmd.after is not None:
            runner.model.installed = cmd.after
        return [runner.model.tree()]


PackageKeys = Annotated[list[str], Field(min_length=1)]


@register
class Install(TransactionStep):
    name = "install"
    summary = "install declared packages (by key) in one transaction"
    example = "install: [base, hello-1]"
    arg_type = PackageKeys

    @classmethod
    def check(cls, value, ctx: ParseContext, loc):
        check_package_keys(value, ctx, loc)
        return value

    @classmethod
    def command(cls, runner, arg) -> Command:
        after = dict(runner.model.installed)
        for key in arg:
            decl = runner.scenario.packages[key]
            after[decl.name] = decl
        return Command(["install"], [runner.target.path_for_package(runner.packages[k]) for k in arg], after)


@register
class Remove(TransactionStep):
    name = "remove"
    summary = "remove installed packages (by package name) in one transaction"
    example = "remove: [hello]"
    arg_type = PackageKeys

    @classmethod
    def command(cls, runner, arg) -> Command:
        after = dict(runner.model.installed)
        for name in arg:
            after.pop(name, None)
        return Command(["remove"], list(arg), after)


StateRef = int | Literal["previous"]


@register
class Activate(TransactionStep):
    name = "activate"
    summary = "make an archived state active: a state id, or `previous` (the newest state before the active one)"
    example = "activate: previous"
    arg_type = Annotated[StateRef, Field(union_mode="left_to_right")]

    @classmethod
    def check(cls, value, ctx, loc):
        if isinstance(value, int) and value < 1:
            from lab.steps import StepArgError
            raise StepArgError(loc, f"activate: state ids start at 1, not {value}")
        return value

    @classmethod
    def command(cls, runner, arg) -> Command:
        state = runner.resolve_state(arg)
        return Command(["state", "activate"], [str(state)], dict(runner.model.states.get(state, {})))


@register
class Prune(TransactionStep):
    name = "prune"
    summary = "remove old states, keeping the newest N"
    example = "prune: 1"
    arg_type = Annotated[int, Field(ge=1, strict=True)]

    @classmethod
    def command(cls, runner, arg) -> Command:
        return Command(["state", "prune"], ["--keep", str(arg)], dict(runner.model.installed))


@register
class Verify(TransactionStep):
    name = "verify"
    summary = ("run `state verify` (`verify: repair`: `state verify --repair`): fails the step when it reports a "
               "problem (left unrepaired)")
    example = "verify: repair"
    arg_type = Literal["repair"] | None
    arg_required = False
    transaction = False  # reads only (or repairs in place): nothing to interrupt

    @classmethod
    def describe(cls, arg) -> str:
        return "verify --repair" if arg == "repair" else "verify"

    @classmethod
    def command(cls, runner, arg) -> Command:
        return Command(["state", "verify"], ["--repair"] if arg == "repair" else [], dict(runner.model.installed))


@register
class Recover(StepKind):
    name = "recover"
    summary = ("run a verb after a crash (reference mode recovers on every start); its exit status must be 0 and "
               "/usr must then be the old or the new tree of the interrupted transaction")
    example = "recover"

    @classmethod
    def run(cls, runner, step, result) -> list:
        outcome = runner.pm(["state", "list"])
        runner.record(result, "stonelab state list", outcome)
        acceptable = runner.interrupted.trees() if runner.interrupted else [runner.model.tree()]
        if not outcome.ok:
            raise StepFailure(f"recovery failed: stonelab state list: {outcome.summary()}")
        lost = sorted(set(runner.model.states) - set(runner.target.observe().db_states))
        if lost:
            raise StepFailure(f"recovery lost committed state(s) {', '.join(map(str, lost))} (tree and row gone: "
                              "no rollback to them is possible)")
        return acceptable
