"""Dependency resolution over provides/depends, as moss does it: a dependency ``kind(name)`` is satisfied by any
package providing exactly that (every package implicitly provides ``name(<its name>)``); ``conflicts`` name
dependencies that may not be provided by another selected package."""
from __future__ import annotations

from dataclasses import dataclass

from reference_impl.stone import Dependency, Meta
from stonelab.errors import StonelabError


class ResolveError(StonelabError):
    pass


@dataclass(frozen=True)
class Candidate:
    meta: Meta
    origin: str  # a file path or repository entry, for messages and for reading the package
    package_id: str


def _version_key(candidate: Candidate) -> tuple[int, int]:
    return candidate.meta.release, candidate.meta.build_release


def resolve(requested: list[Candidate], available: list[Candidate], installed: list[Candidate]) -> list[Candidate]:
    """The full package set of the new state: installed packages (upgraded where a requested package has the same
    name), the requested ones, and everything their dependencies need, closed and conflict-free."""
    names: dict[str, Candidate] = {}
    for candidate in requested:
        previous = names.get(candidate.meta.name)
        if previous is not None and previous.package_id != candidate.package_id:
            raise ResolveError(f"{candidate.origin}: {candidate.meta.name} requested twice "
                               f"({previous.package_id} and {candidate.package_id})")
        names[candidate.meta.name] = candidate
    selected: dict[str, Candidate] = {c.meta.name: c for c in installed}
    selected.update(names)
    preference = {c.package_id: rank for rank, group in enumerate((installed, requested)) for c in group}
    pending = list(selected.values())
    while pending:
        candidate = pending.pop()
        for dependency in candidate.meta.depends:
            if any(dependency in s.meta.all_provides() for s in selected.values()):
                continue
            providers = [a for a in available if dependency in a.meta.all_provides()
                         and a.meta.name not in selected]
            if not providers:
                raise ResolveError(f"{candidate.origin}: {candidate.meta.name} depends on {dependency}, "
                                   f"which no available package provides")
            best = max(providers, key=lambda p: (preference.get(p.package_id, -1), _version_key(p), p.meta.name))
            selected[best.meta.name] = best
            pending.append(best)
    result = sorted(selected.values(), key=lambda c: c.meta.name)
    check_conflicts(result)
    return result


def check_conflicts(selection: list[Candidate]) -> None:
    for candidate in selection:
        for conflict in candidate.meta.conflicts:
            for other in selection:
                if other is not candidate and conflict in other.meta.all_provides():
                    raise ResolveError(f"{candidate.origin}: {candidate.meta.name} conflicts with "
                                       f"{other.meta.name} (conflicts: {conflict})")


def removal(names: list[str], installed: list[Candidate]) -> list[Candidate]:
    """The installed set without ``names``; refused when a remaining package needs what only they provide."""
    by_name = {c.meta.name: c for c in installed}
    for name in names:
        if name not in by_name:
            raise ResolveError(f"{name}: not installed")
    remaining = [c for c in installed if c.meta.name not in names]
    provided: set[Dependency] = {d for c in remaining for d in c.meta.all_provides()}
    for candidate in remaining:
        for dependency in candidate.meta.depends:
            if dependency not in provided:
                gone = next((n for n in names if dependency in by_name[n].meta.all_provides()), "?")
                raise ResolveError(f"cannot remove {gone}: {candidate.meta.name} depends on {dependency}")
    return sorted(remaining, key=lambda c: c.meta.name)
