"""Steps that state an expectation: what /usr must hold, which verb must be refused."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lab.packages import expected_tree
from lab.steps import StepArgError, StepFailure, StepKind, check_package_keys, register


@register
class ExpectUsr(StepKind):
    name = "expect_usr"
    summary = "/usr must be exactly one of the listed package sets (each a list of package keys)"
    example = "expect_usr: [[hello-1], [hello-2]]"
    arg_type = Annotated[list[list[str]], Field(min_length=1)]

    @classmethod
    def check(cls, value, ctx, loc):
        for i, option in enumerate(value):
            check_package_keys(option, ctx, (*loc, i))
        return value

    @classmethod
    def run(cls, runner, step, result) -> list:
        return [expected_tree([runner.scenario.packages[k] for k in keys]) for keys in step.arg]


@register
class ExpectFail(StepKind):
    name = "expect_fail"
    summary = "a transaction that must be refused: non-zero exit, one line on stderr, no traceback, nothing changed"
    example = "expect_fail: {install: [needs-missing]}"
    arg_type = object

    @classmethod
    def check(cls, value, ctx, loc):
        inner = ctx.parse_step(value, loc)
        if not (inner.spec.transaction or getattr(inner.spec, "command", None)):
            raise StepArgError(loc, f"expect_fail: takes a transaction, not {inner.kind!r}")
        return inner

    @classmethod
    def describe(cls, arg) -> str:
        return f"expect_fail {arg.describe()}"

    @classmethod
    def run(cls, runner, step, result) -> list:
        cmd = step.arg.spec.command(runner, step.arg.arg)
        outcome = runner.execute(cmd)
        runner.record(result, cmd.text(), outcome)
        lines = outcome.stderr.strip().splitlines()
        if outcome.ok:
            raise StepFailure(f"{cmd.text()} succeeded but was expected to fail")
        # one line on stderr; a report verb (`state verify`) may instead print its findings on stdout
        report_only = not lines and outcome.stdout.strip()
        if "Traceback" in outcome.stderr or not (len(lines) == 1 or report_only):
            raise StepFailure(f"{cmd.text()} failed without a one-line error ({len(lines)} lines)")
        result.note = lines[0] if lines else outcome.stdout.strip().splitlines()[-1]
        return [runner.model.tree()]
