"""Step kinds: one class per kind of scenario step, registered by name.

A class holds everything about its kind — the argument's type (validated by pydantic), cross-checks against the
scenario (declared packages, nested steps), a one-line description, an example for the docs, and how it runs
against a target — so a new step is one new class in one of the modules imported at the bottom of this file.

In YAML a step is a bare name (``recover``) or a one-key mapping (``install: [hello-1]``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import TypeAdapter, ValidationError

if TYPE_CHECKING:
    from lab.invariants import ExpectedTree
    from lab.packages import PackageDecl
    from lab.runner import Runner, StepResult

Loc = tuple[object, ...]


class StepArgError(Exception):
    """A step argument is wrong: ``loc`` is the field path in the scenario file, ``message`` the problem."""

    def __init__(self, loc: Loc, message: str, *, key: bool = False):
        super().__init__(message)
        self.loc, self.message, self.key = tuple(loc), message, key


class StepFailure(Exception):
    """The system under test did not do what the step asked (a verdict, not a lab error)."""


@dataclass(frozen=True)
class Step:
    """One parsed step: its kind's name, its validated argument, its position in the scenario."""

    kind: str
    arg: Any = None
    index: int = 0

    @property
    def spec(self) -> type[StepKind]:
        return REGISTRY[self.kind]

    def describe(self) -> str:
        return self.spec.describe(self.arg)


@dataclass(frozen=True)
class ParseContext:
    """What a step's cross-checks may consult: the declared packages and a parser for nested steps."""

    packages: dict[str, PackageDecl]
    parse_step: Callable[[object, Loc], Step]
    index: int = 0


class StepKind:
    """Base of every step kind. Subclasses set ``name``, ``summary``, ``example`` and ``arg_type`` (None: the
    step takes no argument) and implement :meth:`run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    example: ClassVar[str]
    arg_type: ClassVar[Any] = None
    arg_required: ClassVar[bool] = True
    #: a transaction of the package manager: may run inside ``crash``/``power_loss``/``expect_fail``
    transaction: ClassVar[bool] = False
    #: run the invariants after this step (a crash leaves judging to the step that recovers)
    checked: ClassVar[bool] = True

    @classmethod
    def parse(cls, raw: object, ctx: ParseContext, loc: Loc) -> Any:
        """The validated argument; raises :class:`StepArgError` naming the field."""
        if cls.arg_type is None:
            if raw is not None:
                raise StepArgError(loc, f"{cls.name} takes no argument")
            return None
        if raw is None and cls.arg_required:
            raise StepArgError(loc, f"{cls.name} needs an argument: {cls.example.strip()}")
        try:
            value = TypeAdapter(cls.arg_type).validate_python(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise StepArgError((*loc, *first["loc"]), _pydantic_message(cls.name, first),
                               key=first["type"] == "extra_forbidden") from None
        return cls.check(value, ctx, loc)

    @classmethod
    def check(cls, value: Any, ctx: ParseContext, loc: Loc) -> Any:
        """Cross-checks against the scenario; returns the final argument."""
        return value

    @classmethod
    def describe(cls, arg: Any) -> str:
        return cls.name if arg is None else f"{cls.name} {arg}"

    @classmethod
    def run(cls, runner: Runner, step: Step, result: StepResult) -> list[ExpectedTree]:
        """Do the step; returns the /usr trees acceptable afterwards. Raises StepFailure when the SUT fails."""
        raise NotImplementedError


def _pydantic_message(kind: str, error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"{kind}: unknown field {error['loc'][-1]!r}"
    if error["type"] == "missing":
        return f"{kind}: missing field {error['loc'][-1]!r}"
    if error["type"] == "value_error":
        return f"{kind}: {str(error['msg']).removeprefix('Value error, ')}"
    return f"{kind}: {error['msg']} (got {error['input']!r})"


REGISTRY: dict[str, type[StepKind]] = {}


def register(cls: type[StepKind]) -> type[StepKind]:
    """Class decorator: make ``cls`` the step kind called ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"step kind {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def check_package_keys(keys: list[str], ctx: ParseContext, loc: Loc) -> None:
    for i, key in enumerate(keys):
        if key not in ctx.packages:
            raise StepArgError((*loc, i), f"undeclared package {key!r} (declared: {', '.join(ctx.packages) or 'none'})")


# The modules that define step kinds (imported for their registrations).
from lab.steps import transactions as _transactions  # noqa: E402,F401
from lab.steps import faults as _faults  # noqa: E402,F401
from lab.steps import expectations as _expectations  # noqa: E402,F401
from lab.steps import system as _system  # noqa: E402,F401
