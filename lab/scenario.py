"""Scenarios: typed model of `scenarios/*.yaml`, loaded with safe YAML and validated field by field.

A scenario names its packages (generated at run time from a few declared files), then a list of steps that read
like sentences::

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

Errors name the file and the field: ``scenarios/x.yaml: steps[2]: unknown step 'instal'``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stonelab.errors import StonelabError
from stonelab.yamlfile import read_yaml

STEP_KINDS = {
    "install": "packages to install in one transaction",
    "remove": "package names to remove in one transaction",
    "activate": "a state id, or 'previous' for the state before the active one",
    "prune": "number of states to keep",
    "verify": "run `state verify`; fails the step when it reports problems",
    "crash": "{at: FAULT_POINT, during: STEP}: the step dies at that point",
    "recover": "run a verb after a crash (recovery runs on every start)",
    "corrupt_store": "overwrite one asset of the store with other bytes",
    "expect_usr": "list of package sets: /usr must match exactly one of them",
    "expect_fail": "a step that must fail with a non-zero exit and a one-line error",
    "power_cut": "{after: STEP}: a real system's STEP runs in the guest, the power is cut the moment it returns",
}
FILESYSTEMS = ("ext4", "ext2")  # the SUT root in the guest (ext2: Asterinas 0.18.1's only persistent root)
INVARIANTS = ("atomic_usr", "staging_empty", "stateless", "store_integrity", "state_id_matches")
TARGETS = ("any", "host", "vm")  # any: wherever the run puts it (`stonelab run --target`, default host)
SWAPS = ("auto", "exchange", "symlink")
MODES = ("reference", "moss-compat")


@dataclass(frozen=True)
class PackageDecl:
    key: str
    name: str
    version: str
    release: int = 1
    files: dict[str, str] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    depends: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    kind: str
    arg: object = None
    index: int = 0

    def describe(self) -> str:
        if self.arg is None:
            return self.kind
        return f"{self.kind} {self.arg}"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    description: str = ""
    target: str = "any"
    swap: str = "auto"
    mode: str = "reference"
    packages: dict[str, PackageDecl] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    invariants: tuple[str, ...] = INVARIANTS
    # invariants the scenario is written to catch failing, per target ("*": any target)
    expect_violations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    system: str = "reference"  # lab.systems.SYSTEMS: reference (mode: reference|moss-compat), nix, ostree
    filesystem: str = "ext4"  # the SUT root's file system on the vm target (lab.systems.guest.RootFilesystem)
    upstream: str = ""  # the upstream report(s) the expected violations reproduce, e.g. "NixOS/nix#1218"

    def expected_for(self, target: str) -> tuple[str, ...]:
        return self.expect_violations.get(target, self.expect_violations.get("*", ()))


class ScenarioError(StonelabError):
    pass


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    return parse_scenario(read_yaml(path, error=ScenarioError, kind="not valid YAML"), path)


def parse_scenario(data: object, path: Path) -> Scenario:
    def fail(where: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{path}: {where}: {problem}")

    if not isinstance(data, dict):
        raise fail("top level", "expected a mapping")
    allowed = {"name", "description", "target", "swap", "mode", "packages", "steps", "invariants",
               "expect_violations", "tags", "system", "filesystem", "upstream"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise fail("top level", f"unknown field(s) {', '.join(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", "required, a non-empty string")
    for key, choices in (("target", TARGETS), ("swap", SWAPS), ("mode", MODES), ("filesystem", FILESYSTEMS)):
        if key in data and data[key] not in choices:
            raise fail(key, f"{data[key]!r} is not one of {', '.join(choices)}")
    system, known_invariants = _parse_system(data, fail)
    packages = _parse_packages(data.get("packages") or {}, fail)
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise fail("steps", "required, a non-empty list")
    steps = [_parse_step(raw, i, packages, fail) for i, raw in enumerate(steps_raw)]
    from lab.systems.run import check_steps  # lab.systems builds on this module
    check_steps(system, data.get("target", "any"), steps, fail)
    invariants = tuple(data.get("invariants") or known_invariants)
    expected = _parse_expected(data.get("expect_violations"), fail)
    for label, names in (("invariants", invariants), *(("expect_violations", v) for v in expected.values())):
        bad = [n for n in names if n not in known_invariants]
        if bad:
            raise fail(label, f"unknown invariant(s) {', '.join(map(str, bad))} for system {system!r}; "
                              f"known: {', '.join(known_invariants)}")
    return Scenario(
        name=name, path=path, description=str(data.get("description") or ""), target=data.get("target", "any"),
        swap=data.get("swap", "auto"), mode=data.get("mode", "reference"), packages=packages, steps=steps,
        invariants=invariants, expect_violations=expected, tags=tuple(data.get("tags") or ()), system=system,
        filesystem=data.get("filesystem", "ext4"), upstream=str(data.get("upstream") or ""),
    )


def _parse_system(data: dict, fail) -> tuple[str, tuple[str, ...]]:
    """The system under test and the invariants it can be judged by; ``mode``/``swap`` are the reference's."""
    from lab.systems import SYSTEMS  # lab.systems builds on this module
    system = data.get("system", "reference")
    if system not in SYSTEMS:
        raise fail("system", f"{system!r} is not one of {', '.join(SYSTEMS)}")
    if system == "reference":
        return system, INVARIANTS
    for key in ("mode", "swap"):
        if key in data:
            raise fail(key, f"applies to the reference implementation only, not to system {system!r}")
    if "filesystem" in data and data.get("target") != "vm":
        raise fail("filesystem", "the root's file system is chosen on the vm target only (target: vm)")
    from lab.systems.crashcheck import CRASH_INVARIANTS
    return system, (*CRASH_INVARIANTS, *SYSTEMS[system][0].invariant_names)


def _parse_expected(raw: object, fail) -> dict[str, tuple[str, ...]]:
    """A list (any target) or a mapping target → list: a process kill and a power cut break different things."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {"*": tuple(raw)}
    if isinstance(raw, dict):
        unknown = [k for k in raw if k not in TARGETS]
        if unknown:
            raise fail("expect_violations", f"unknown target(s) {', '.join(map(str, unknown))}; "
                                            f"known: {', '.join(TARGETS)}")
        if not all(isinstance(v, list) for v in raw.values()):
            raise fail("expect_violations", "each target needs a list of invariants")
        return {k: tuple(v) for k, v in raw.items()}
    raise fail("expect_violations", "a list of invariants, or a mapping target: list")


def _parse_packages(raw: object, fail) -> dict[str, PackageDecl]:
    if not isinstance(raw, dict):
        raise fail("packages", "expected a mapping of key: package")
    packages = {}
    fields = {"name", "version", "release", "files", "symlinks", "depends", "provides", "conflicts"}
    for key, spec in raw.items():
        where = f"packages.{key}"
        if not isinstance(spec, dict):
            raise fail(where, "expected a mapping")
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise fail(where, f"unknown field(s) {', '.join(unknown)}")
        if not spec.get("name") or spec.get("version") is None:
            raise fail(where, "needs name and version")
        for mapping in ("files", "symlinks"):
            value = spec.get(mapping) or {}
            if not isinstance(value, dict):
                raise fail(f"{where}.{mapping}", "expected a mapping of path: content")
            for rel in value:
                if str(rel).startswith("/") or ".." in str(rel).split("/"):
                    raise fail(f"{where}.{mapping}", f"path {rel!r} must be relative to /usr and stay inside it")
        packages[str(key)] = PackageDecl(
            key=str(key), name=str(spec["name"]), version=str(spec["version"]), release=int(spec.get("release", 1)),
            files={str(k): str(v) for k, v in (spec.get("files") or {}).items()},
            symlinks={str(k): str(v) for k, v in (spec.get("symlinks") or {}).items()},
            depends=list(spec.get("depends") or []), provides=list(spec.get("provides") or []),
            conflicts=list(spec.get("conflicts") or []),
        )
    return packages


def _parse_step(raw: object, index: int, packages: dict[str, PackageDecl], fail) -> Step:
    where = f"steps[{index}]"
    if isinstance(raw, str):
        kind, arg = raw, None
    elif isinstance(raw, dict) and len(raw) == 1:
        kind, arg = next(iter(raw.items()))
    else:
        raise fail(where, "a step is a name or a one-key mapping")
    if kind not in STEP_KINDS:
        raise fail(where, f"unknown step {kind!r}; known: {', '.join(STEP_KINDS)}")
    if kind == "install":
        _check_keys(arg, packages, f"{where}.install", fail)
    elif kind == "crash":
        if not isinstance(arg, dict) or set(arg) != {"at", "during"}:
            raise fail(where, "crash needs {at: FAULT_POINT, during: STEP}")
        inner = _parse_step(arg["during"], index, packages, fail)
        if inner.kind not in ("install", "remove", "activate", "prune"):
            raise fail(where, f"can only crash during a transaction, not {inner.kind!r}")
        arg = {"at": str(arg["at"]), "during": inner}
    elif kind == "expect_fail":
        arg = _parse_step(arg, index, packages, fail)
    elif kind == "power_cut":
        if not isinstance(arg, dict) or set(arg) != {"after"}:
            raise fail(where, "power_cut needs {after: STEP}")
        inner = _parse_step(arg["after"], index, packages, fail)
        if inner.kind not in ("install", "remove", "prune"):
            raise fail(where, f"power_cut follows an operation that makes a generation (install, remove, prune), "
                              f"not {inner.kind!r}")
        arg = {"after": inner}
    elif kind == "expect_usr":
        if not isinstance(arg, list) or not all(isinstance(s, list) for s in arg):
            raise fail(where, "expect_usr takes a list of package-key lists")
        for option in arg:
            _check_keys(option, packages, f"{where}.expect_usr", fail)
    elif kind in ("remove",) and not (isinstance(arg, list) and arg):
        raise fail(where, "remove takes a list of package names")
    elif kind == "activate" and not (arg == "previous" or isinstance(arg, int)):
        raise fail(where, "activate takes a state id or 'previous'")
    elif kind == "prune" and not isinstance(arg, int):
        raise fail(where, "prune takes the number of states to keep")
    return Step(kind, arg, index)


def _check_keys(arg: object, packages: dict[str, PackageDecl], where: str, fail) -> None:
    if not isinstance(arg, list) or not arg and where.endswith("install"):
        raise fail(where, "expected a list of package keys")
    missing = [k for k in arg if k not in packages]
    if missing:
        raise fail(where, f"undeclared package(s) {', '.join(map(str, missing))}")


def load_suite(directory: str | Path) -> list[Scenario]:
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ScenarioError(f"{directory}: no scenario files (*.yaml)")
    return [load_scenario(f) for f in files]
