"""Dependency resolution over provides/depends, as moss does it.

A dependency ``kind(name)`` is satisfied by any package whose provides contain exactly that (every package
implicitly provides ``name(<its name>)``); ``conflicts`` name dependencies that no *other* selected package may
provide. Names are unique in a selection: a requested package replaces an installed one of the same name
(upgrade or downgrade).

Choice of a provider, when a dependency is not already met by the selection (installed packages that are kept,
then requested ones, always win because they are selected first): the candidates from ``available`` that do not
clash with the selection (same name as a selected package, or a conflict either way), of those the
alphabetically first name, and of that name the highest ``(release, build_release)``. The traversal is
breadth-first in name order, so the result depends only on the inputs, not on their order.
"""
from __future__ import annotations

from collections import defaultdict, deque
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
    from_repository: bool = False   # origin is a file a repository index describes (hash and size to check)


def _version_key(candidate: Candidate) -> tuple[int, int]:
    return candidate.meta.release, candidate.meta.build_release


class _Selection:
    """Selected packages by name, with an index of what they provide."""

    def __init__(self) -> None:
        self.by_name: dict[str, Candidate] = {}
        self.providers: dict[Dependency, set[str]] = defaultdict(set)

    def add(self, candidate: Candidate) -> None:
        self.by_name[candidate.meta.name] = candidate
        for provided in candidate.meta.all_provides():
            self.providers[provided].add(candidate.meta.name)

    def provides(self, dependency: Dependency) -> bool:
        return bool(self.providers.get(dependency))

    def clashes(self, candidate: Candidate) -> bool:
        if candidate.meta.name in self.by_name:
            return True
        own = candidate.meta.name
        if any(self.providers.get(c, set()) - {own} for c in candidate.meta.conflicts):
            return True
        provided = set(candidate.meta.all_provides())
        return any(c in provided for s in self.by_name.values() for c in s.meta.conflicts)


def resolve(requested: list[Candidate], available: list[Candidate], installed: list[Candidate]) -> list[Candidate]:
    """The full package set of the new state, sorted by name: installed packages (replaced where a requested
    package has the same name), the requested ones, and everything their dependencies need, closed under
    ``depends`` and conflict-free. Raises a one-line ResolveError otherwise."""
    wanted: dict[str, Candidate] = {}
    for candidate in sorted(requested, key=lambda c: (c.meta.name, c.package_id)):
        previous = wanted.get(candidate.meta.name)
        if previous is not None and previous.package_id != candidate.package_id:
            raise ResolveError(f"{candidate.origin}: {candidate.meta.name} requested twice "
                               f"({previous.package_id} and {candidate.package_id})")
        wanted[candidate.meta.name] = candidate

    selection = _Selection()
    for candidate in installed:
        if candidate.meta.name not in wanted:
            selection.add(candidate)
    for candidate in wanted.values():
        selection.add(candidate)

    providers_of: dict[Dependency, list[Candidate]] = defaultdict(list)
    for candidate in available:
        for provided in candidate.meta.all_provides():
            providers_of[provided].append(candidate)

    pending = deque(sorted(selection.by_name.values(), key=lambda c: c.meta.name))
    while pending:
        candidate = pending.popleft()
        for dependency in sorted(set(candidate.meta.depends)):
            if selection.provides(dependency):
                continue
            choices = [p for p in providers_of.get(dependency, []) if not selection.clashes(p)]
            if not choices:
                raise ResolveError(_missing(candidate, dependency, providers_of.get(dependency, []), selection))
            best = min(choices, key=lambda p: (p.meta.name, tuple(-v for v in _version_key(p)), p.package_id))
            selection.add(best)
            pending.append(best)

    result = sorted(selection.by_name.values(), key=lambda c: c.meta.name)
    check_conflicts(result)
    return result


def _missing(candidate: Candidate, dependency: Dependency, providers: list[Candidate],
             selection: _Selection) -> str:
    message = (f"{candidate.origin}: {candidate.meta.name} depends on {dependency}, "
               f"which no available package provides")
    if providers:
        first = min(providers, key=lambda p: (p.meta.name, p.package_id))
        if first.meta.name in selection.by_name:
            message += f" (only {first.package_id}, and {selection.by_name[first.meta.name].package_id} is selected)"
        else:
            message += f" (only {first.package_id}, which conflicts with the selection)"
    return message


def check_conflicts(selection: list[Candidate]) -> None:
    """Raise when a package's ``conflicts`` names something another package of ``selection`` provides."""
    for candidate in selection:
        for conflict in candidate.meta.conflicts:
            for other in selection:
                if other.meta.name != candidate.meta.name and conflict in other.meta.all_provides():
                    raise ResolveError(f"{candidate.origin}: {candidate.meta.name} conflicts with "
                                       f"{other.meta.name} (conflicts: {conflict})")


def removal(names: list[str], installed: list[Candidate]) -> list[Candidate]:
    """The installed set without ``names``, sorted by name; refused when a remaining package needs what only the
    removed ones provided (dependencies that were already unmet before are not this removal's doing)."""
    by_name = {c.meta.name: c for c in installed}
    for name in names:
        if name not in by_name:
            raise ResolveError(f"cannot remove {name}: not installed")
    removed = set(names)
    remaining = [c for c in installed if c.meta.name not in removed]
    still_provided: set[Dependency] = {d for c in remaining for d in c.meta.all_provides()}
    for candidate in sorted(remaining, key=lambda c: c.meta.name):
        for dependency in sorted(set(candidate.meta.depends)):
            if dependency in still_provided:
                continue
            gone = sorted(n for n in removed if dependency in by_name[n].meta.all_provides())
            if gone:
                raise ResolveError(f"cannot remove {gone[0]}: {candidate.meta.name} depends on {dependency}")
    return sorted(remaining, key=lambda c: c.meta.name)
