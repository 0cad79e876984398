"""Steps that inject faults: a crash at a named fault point, a corrupted store."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lab.crash.model import Model
from lab.packages import expected_tree
from lab.invariants import ExpectedTree
from lab.steps import StepArgError, StepFailure, StepKind, register
from reference_impl.faults import FAULT_POINTS

FaultPoint = Literal[FAULT_POINTS]  # type: ignore[valid-type]


class Interrupted:
    """A transaction that died: recovery may leave the old tree or the new one, nothing else."""

    def __init__(self, old: ExpectedTree, new: ExpectedTree, new_installed: dict[str, Any]):
        self.old, self.new, self.new_installed = old, new, new_installed

    def trees(self) -> list[ExpectedTree]:
        return [self.old, self.new]


def parse_transaction(raw: object, ctx, loc, kind: str):
    """A nested step that must be a transaction of the package manager."""
    inner = ctx.parse_step(raw, loc)
    if not inner.spec.transaction:
        raise StepArgError(loc, f"{kind}: can only interrupt a transaction "
                                f"({', '.join(_transaction_kinds())}), not {inner.kind!r}")
    return inner


def _transaction_kinds() -> list[str]:
    from lab.steps import REGISTRY
    return [name for name, cls in REGISTRY.items() if cls.transaction]


class InterruptingStep(StepKind):
    """A step that interrupts a transaction given as ``during: STEP`` (crash, power_loss)."""

    checked = False

    @classmethod
    def check(cls, value, ctx, loc):
        return value.model_copy(update={"during": parse_transaction(value.during, ctx, (*loc, "during"), cls.name)})


def cut_note(runner, model: Model | None, outcome) -> str:
    """The step's note after a power cut: the power-loss model it used, and what the disk lost."""
    semantics = runner.target.cut_semantics(model) if model else runner.target.crash_semantics
    return f"{semantics} ({outcome.lost})" if outcome.lost else semantics


class CrashArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: FaultPoint
    during: Any
    model: Model | None = None  # vm target: what the cut loses — volatile-cache (default) | optimistic


@register
class Crash(InterruptingStep):
    name = "crash"
    summary = ("run a transaction that dies at a named fault point (`stonelab faults`): SIGKILL on the host "
               "target, a power cut on the vm target")
    example = "crash: {at: swap.after, during: {install: [hello-2]}}"
    arg_type = CrashArgs

    @classmethod
    def describe(cls, arg: CrashArgs) -> str:
        return f"crash at {arg.at} during {arg.during.describe()}"

    @classmethod
    def run(cls, runner, step, result) -> list:
        point, inner = step.arg.at, step.arg.during
        cmd = inner.spec.command(runner, inner.arg)
        outcome = runner.pm(cmd.verb, *cmd.rest, fault=point, cut_model=step.arg.model)
        runner.record(result, f"STONELAB_FAULT={point}:crash {cmd.text()}", outcome)
        if not outcome.crashed:
            raise StepFailure(f"fault point {point} was not reached ({outcome.summary()})")
        result.status = "crashed"
        result.note = cut_note(runner, step.arg.model, outcome)
        runner.interrupt(cmd.after)
        return runner.interrupted.trees()


@register
class CorruptStore(StepKind):
    name = "corrupt_store"
    summary = "flip the first byte of the largest asset in the content store (bit rot, a torn write)"
    example = "corrupt_store"

    @classmethod
    def run(cls, runner, step, result) -> list:
        result.note = f"overwrote the first byte of /{runner.target.corrupt_asset()}"
        return [runner.model.tree()]
