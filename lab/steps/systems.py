"""Steps only real systems under test (``system: nix|ostree``) take: a power cut the moment an operation returns.

The reference is cut at its named fault points instead (``crash``); Nix and OSTree have none, so the cut comes
when the operation has reported its result — the moment ALICE's contract is about. They run in
:class:`lab.systems.run.SystemRunner`, which calls :func:`lab.systems.run.SystemRunner.power_cut`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from lab.steps import StepArgError, StepFailure, StepKind, register

CUTTABLE = ("install", "remove", "prune")  # the operations that make or drop a generation


class PowerCutArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    after: Any


@register
class PowerCut(StepKind):
    name = "power_cut"
    summary = ("a real system's operation runs in the guest (vm target), the power is cut the moment it returns; "
               "after a reboot the crash state is judged with ALICE's contract (durable_success, atomic_usr)")
    example = "power_cut: {after: {install: [hello-2]}}"
    arg_type = PowerCutArgs
    real_systems_only = True  # system: nix|ostree on the vm target (checked when the scenario is loaded)

    @classmethod
    def check(cls, value: PowerCutArgs, ctx, loc):
        inner = ctx.parse_step(value.after, (*loc, "after"))
        if inner.kind not in CUTTABLE:
            raise StepArgError((*loc, "after"), f"power_cut follows an operation that makes a generation "
                                                f"({', '.join(CUTTABLE)}), not {inner.kind!r}")
        return value.model_copy(update={"after": inner})

    @classmethod
    def describe(cls, arg) -> str:
        return f"power_cut after {arg.after.describe()}"

    @classmethod
    def run(cls, runner, step, result) -> list:
        raise StepFailure("power_cut runs on real systems only (system: nix|ostree, target: vm)")
