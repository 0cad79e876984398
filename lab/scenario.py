"""Scenarios: the typed model of `scenarios/*.yaml` (pydantic), read with YAML line marks.

A scenario names its packages (generated at run time from a few declared files), then a list of steps that read
like sentences (the step kinds are in :mod:`lab.steps`, one class each)::

    name: crash-during-swap
    packages:
      hello-1: {name: hello, version: "1", files: {bin/hello: "one"}}
      hello-2: {name: hello, version: "2", files: {bin/hello: "two"}}
    steps:
      - install: [hello-1]
      - crash: {at: swap.after, during: {install: [hello-2]}}
      - recover
      - expect_usr: [[hello-1], [hello-2]]     # either the old or the new tree, nothing in between
    expect_violations: []                      # invariants this scenario is meant to catch failing

A ``matrix:`` key runs the same steps for every combination of ``mode`` and ``swap``; ``cells:`` adjust the
expectation of some combinations (``when: {mode: moss-compat}``), name the upstream issue a moss-compat cell
reproduces (``upstream:``), or say why a combination does not apply (``not_applicable:``).

Every error is one line ``FILE:LINE:COL: field: problem`` (:class:`ScenarioError`, exit status 2).
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from lab.invariants import CRASH_STATE_INVARIANTS, INVARIANTS
from lab.packages import PackageDecl
from lab.steps import REGISTRY, Loc, ParseContext, Step, StepArgError
from lab.systems import CRASH_INVARIANTS, SYSTEMS, RootFilesystem, SystemName, invariants_of
from lab.target import TargetKind
from reference_impl.swap import SwapStrategy
from reference_impl.transaction import Mode
from stonelab.errors import StonelabError
from stonelab.yamlfile import MarkedYaml, read_yaml_marked

__all__ = ["PackageDecl", "Scenario", "ScenarioError", "Step", "load_scenario", "load_scenarios", "load_suite"]


class ScenarioError(StonelabError):
    """A scenario file is unreadable or invalid; the message is ``FILE:LINE:COL: problem``."""


# every invariant any system is judged by (which apply to a scenario's system is checked after the model)
_ALL_INVARIANTS = tuple(dict.fromkeys([*INVARIANTS, *CRASH_STATE_INVARIANTS, *CRASH_INVARIANTS,
                                       *(n for cls, _ in SYSTEMS.values() for n in cls.invariant_names)]))


def _known_invariant(name: str) -> str:
    if name not in _ALL_INVARIANTS:
        raise ValueError(f"unknown invariant {name!r}; known: {', '.join(_ALL_INVARIANTS)}")
    return name


InvariantName = Annotated[str, AfterValidator(_known_invariant)]
Expectation = list[InvariantName] | dict[TargetKind, list[InvariantName]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MatrixAxes(_Strict):
    mode: list[Mode] = Field(default_factory=lambda: [Mode.REFERENCE], min_length=1)
    swap: list[SwapStrategy] = Field(default_factory=lambda: [SwapStrategy.AUTO], min_length=1)


class CellMatch(_Strict):
    mode: Mode | None = None
    swap: SwapStrategy | None = None


class Cell(_Strict):
    """Adjustments for the matrix cells ``when`` matches; later cells override earlier ones."""

    when: CellMatch
    expect_violations: Expectation | None = None
    upstream: str | None = None
    not_applicable: str | None = None


class ScenarioFile(_Strict):
    """The document as written (steps still raw: each is validated by its step kind)."""

    name: str = Field(min_length=1)
    description: str = ""
    target: TargetKind = TargetKind.ANY
    swap: SwapStrategy = SwapStrategy.AUTO
    mode: Mode = Mode.REFERENCE
    packages: dict[str, PackageDecl] = Field(default_factory=dict)
    steps: list[Any] = Field(min_length=1)
    invariants: list[InvariantName] | None = None
    expect_violations: Expectation | None = None
    tags: list[str] = Field(default_factory=list)
    upstream: str = ""
    esp: bool = False
    matrix: MatrixAxes | None = None
    cells: list[Cell] = Field(default_factory=list)
    system: SystemName = SystemName.REFERENCE
    filesystem: RootFilesystem = RootFilesystem.EXT4


@dataclass(frozen=True)
class Scenario:
    """One runnable scenario (one cell of a matrix file). ``expect_violations`` maps a target ('*': any) to the
    invariants the scenario is written to catch failing; ``upstream`` names the upstream issue a moss-compat
    scenario reproduces; ``not_applicable`` says why this cell is not run."""

    name: str
    path: Path
    description: str = ""
    target: TargetKind = TargetKind.ANY
    swap: SwapStrategy = SwapStrategy.AUTO
    mode: Mode = Mode.REFERENCE
    packages: dict[str, PackageDecl] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    invariants: tuple[str, ...] = tuple(INVARIANTS)
    expect_violations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    upstream: str = ""
    not_applicable: str = ""
    family: str = ""  # the file's scenario name, shared by every cell of a matrix
    esp: bool = False  # transactions synchronise boot entries on the target's system disk (--esp)
    system: SystemName = SystemName.REFERENCE  # the system under test (lab.systems)
    filesystem: RootFilesystem = RootFilesystem.EXT4  # the SUT root's file system on the vm target (real systems)

    @property
    def uses_esp(self) -> bool:
        """The scenario touches the system disk's ESP (so the lab observes it after every step)."""
        return self.esp or any(getattr(s.spec, "uses_esp", False) for s in self.steps)

    def expected_for(self, target: str) -> tuple[str, ...]:
        return self.expect_violations.get(target, self.expect_violations.get("*", ()))


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Every scenario a file defines: one, or one per matrix cell. Raises ScenarioError (FILE:LINE:COL)."""
    doc = read_yaml_marked(path, error=ScenarioError, kind="not valid YAML")
    if not isinstance(doc.data, dict):
        raise ScenarioError(doc.located((), "top level: expected a mapping of scenario fields"))
    try:
        spec = ScenarioFile.model_validate(doc.data)
    except ValidationError as err:
        raise ScenarioError(_first_error(doc, err)) from None
    except RecursionError:
        raise ScenarioError(doc.located((), "a YAML alias refers to itself")) from None
    packages = {key: decl.model_copy(update={"key": key}) for key, decl in spec.packages.items()}
    try:
        steps = _parse_steps(doc, spec.steps, packages)
    except RecursionError:
        raise ScenarioError(doc.located(("steps",), "steps: a YAML alias refers to itself")) from None
    if spec.target == TargetKind.HOST:
        explored = next((s for s in steps if s.kind == "power_loss" and s.arg.explore), None)
        if explored is not None:
            raise ScenarioError(doc.located(("target",), "target: power_loss explore checks the crash states of a "
                                                         "recorded virtual disk: the scenario needs target vm (or any)"))
    _check_system(doc, spec, steps)
    return [_cell(spec, doc.path, packages, steps, mode, swap) for mode, swap in _combinations(spec)]


def load_scenario(path: str | Path) -> Scenario:
    """The one scenario of a file without a matrix (a matrix file's first cell otherwise)."""
    return load_scenarios(path)[0]


def load_suite(directory: str | Path) -> list[Scenario]:
    """Every scenario of every ``*.yaml`` in ``directory``, names unique."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ScenarioError(f"{directory}: no scenario files (*.yaml)")
    scenarios = [s for f in files for s in load_scenarios(f)]
    seen: dict[str, Path] = {}
    for scenario in scenarios:
        if scenario.name in seen:
            raise ScenarioError(f"{scenario.path}:1:1: name: {scenario.name!r} is also the name of a scenario "
                                f"in {seen[scenario.name]}")
        seen[scenario.name] = scenario.path
    return scenarios


def _combinations(spec: ScenarioFile) -> list[tuple[Mode, SwapStrategy]]:
    if spec.matrix is None:
        return [(spec.mode, spec.swap)]
    return list(itertools.product(spec.matrix.mode, spec.matrix.swap))


def _cell(spec: ScenarioFile, path: Path, packages: dict[str, PackageDecl], steps: list[Step], mode: Mode,
          swap: SwapStrategy) -> Scenario:
    expected, upstream, not_applicable = spec.expect_violations, spec.upstream, ""
    for cell in spec.cells:
        if cell.when.mode not in (None, mode) or cell.when.swap not in (None, swap):
            continue
        expected = cell.expect_violations if cell.expect_violations is not None else expected
        upstream = cell.upstream if cell.upstream is not None else upstream
        not_applicable = cell.not_applicable if cell.not_applicable is not None else not_applicable
    name = spec.name if spec.matrix is None else f"{spec.name}[{mode}/{swap}]"
    return Scenario(
        name=name, path=path, description=spec.description, target=spec.target, swap=swap, mode=mode,
        packages=packages, steps=steps, invariants=tuple(spec.invariants or _default_invariants(spec.system)),
        expect_violations=_expectation(expected), tags=tuple(spec.tags), upstream=upstream,
        not_applicable=not_applicable, family=spec.name, esp=spec.esp, system=spec.system,
        filesystem=spec.filesystem)


def _default_invariants(system: SystemName) -> tuple[str, ...]:
    return tuple(INVARIANTS) if system == SystemName.REFERENCE else invariants_of(system)


def _check_system(doc: MarkedYaml, spec: ScenarioFile, steps: list[Step]) -> None:
    """What the scenario asks must exist for its system: options, invariants, steps (one located line)."""
    from lab.systems.run import check_steps  # it runs scenarios, so it builds on this module

    def fail(loc: Loc, problem: str, key: bool = False) -> ScenarioError:
        return ScenarioError(doc.located(loc, f"{_dotted(loc)}: {problem}", key=key))

    given = doc.data
    if "filesystem" in given and spec.target != TargetKind.VM:
        raise fail(("filesystem",), "the root's file system is chosen on the vm target only (target: vm)", True)
    if spec.system != SystemName.REFERENCE:
        for key in ("mode", "swap", "matrix"):
            if key in given:
                raise fail((key,), f"applies to the reference implementation only, not to system "
                                   f"{str(spec.system)!r}", True)
    allowed = _default_invariants(spec.system)
    # judged on the crash engine's states, whatever the system
    allowed = (*allowed, *(name for name in CRASH_STATE_INVARIANTS if name not in allowed))
    named = [(("invariants", i), n) for i, n in enumerate(spec.invariants or ())]
    raw = spec.expect_violations
    for target, names in (raw.items() if isinstance(raw, dict) else [(None, raw or [])]):
        where = ("expect_violations",) if target is None else ("expect_violations", str(target))
        named += [((*where, i), n) for i, n in enumerate(names)]
    for loc, name in named:
        if name not in allowed:
            raise fail(loc, f"invariant {name!r} does not apply to system {str(spec.system)!r}; "
                            f"known: {', '.join(allowed)}")
    check_steps(str(spec.system), str(spec.target), steps, lambda index, problem: fail(("steps", index), problem))


def _expectation(raw: list[str] | dict[TargetKind, list[str]] | None) -> dict[str, tuple[str, ...]]:
    """A list (any target) or a mapping target → list: a process kill and a power cut break different things."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {"*": tuple(raw)}
    return {str(k): tuple(v) for k, v in raw.items()}


def _parse_steps(doc: MarkedYaml, raw_steps: list[Any], packages: dict[str, PackageDecl]) -> list[Step]:
    steps = []
    for index, raw in enumerate(raw_steps):
        def parse(item: object, loc: Loc, _index: int = index) -> Step:
            return _parse_step(item, loc, ParseContext(packages, parse, _index))
        try:
            steps.append(parse(raw, ("steps", index)))
        except StepArgError as err:
            raise ScenarioError(doc.located(err.loc, f"{_dotted(err.loc)}: {err.message}", key=err.key)) from None
    return steps


def _parse_step(raw: object, loc: Loc, ctx: ParseContext) -> Step:
    if isinstance(raw, str):
        kind, arg, arg_loc = raw, None, loc
    elif isinstance(raw, dict) and len(raw) == 1:
        kind, arg = next(iter(raw.items()))
        arg_loc = (*loc, kind)
    else:
        raise StepArgError(loc, "a step is a name or a one-key mapping (name: argument)")
    if kind not in REGISTRY:
        close = difflib.get_close_matches(str(kind), REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StepArgError(loc if isinstance(raw, str) else (*loc, kind),
                           f"unknown step {kind!r}{hint}; known: {', '.join(REGISTRY)}", key=True)
    return Step(kind, REGISTRY[kind].parse(arg, ctx, arg_loc), ctx.index)


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


def _document_path(data: object, pydantic_loc: tuple) -> tuple:
    """The parts of a pydantic error location that name keys and indexes of the document; the others are
    pydantic's own labels (a union branch such as ``list[str]``, ``[key]``). A key may contain any character,
    so the document decides, not the spelling."""
    path, node = [], data
    for part in pydantic_loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
    return tuple(path)


def _first_error(doc: MarkedYaml, err: ValidationError) -> str:
    errors = err.errors()
    # a union (list or mapping) reports one error per branch: the deepest names the real problem
    first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
    on_key = "[key]" in first["loc"]
    loc = _document_path(doc.data, first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown field {(loc or first['loc'])[-1]!r}"
        loc_for_mark, key = loc, True
    elif kind == "missing":
        loc = (*loc, first["loc"][-1])  # the field the document lacks
        message = "required field missing"
        loc_for_mark, key = loc, False
    else:
        text = str(first["msg"]).removeprefix("Value error, ")
        message = f"{text} (got {first['input']!r})" if "got" not in text and kind != "value_error" else text
        loc_for_mark, key = loc, on_key
    others = sum(1 for e in errors if e["loc"][:1] != first["loc"][:1])
    more = f" (+{others} more problem{'s' if others > 1 else ''})" if others else ""
    return doc.located(loc_for_mark, f"{_dotted(loc)}: {message}{more}", key=key)
