"""Crash-state enumeration for one recorded operation (CrashMonkey-style bounded black-box exploration).

The operation occupies the log positions ``[start, end]`` (timeline marks taken when the command started and
when it returned).  Cut points are every FLUSH entry in that window (the power fails while the flush is still
pending: the writes before it are in flight) and ``end`` (right after the command returned).  For each cut point
the model gives the flush boundary and the writes in flight, and the states are:

* ``boundary``: exactly the boundary (every in-flight write lost);
* ``prefix``: the first k in-flight writes, in issue order (k = 1..n);
* ``subset``: every subset of the in-flight writes when there are at most ``subset_limit`` of them, else
  ``sample_per_cut`` subsets drawn with a seeded generator (``sample``).  Subsets that drop an earlier write and
  keep a later one are the states only a volatile cache can leave; the optimistic model has prefixes only.

FUA units are in every state whose cut follows them.  States are de-duplicated on (boundary, write set,
after-return); when more than ``max_states`` remain, the two states right after the return come first (all
in-flight writes lost, all kept), then states taken in turn from the boundary states, the reordering subsets and
the prefixes (seeded order within each).  The same recording, window, model and seed always give the same list.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from lab.crash.logwrites import Recording
from lab.crash.model import CrashState, Model, PowerLoss, Unit

KIND_ORDER = {"boundary": 0, "prefix": 1, "subset": 2, "sample": 3}


@dataclass(frozen=True)
class Window:
    """Log positions (entry counts) when the operation started and returned, and its exit status."""

    start: int
    end: int
    exit_status: int = 0


def cut_points(recording: Recording, window: Window) -> list[int]:
    """Every FLUSH entry's index inside the window (the flush pending), then the window's end."""
    cuts = [e.index for e in recording.entries[window.start:window.end] if e.is_flush]
    return sorted(set(cuts) | {window.end})


def enumerate_states(recording: Recording, window: Window, power: PowerLoss, *, max_states: int = 200,
                     seed: int = 0, subset_limit: int = 6, sample_per_cut: int = 32) -> list[CrashState]:
    """The crash states of ``window`` under ``power``, at most ``max_states``, ordered by cut then kind."""
    rng = random.Random(seed)
    found: dict[tuple, CrashState] = {}

    def add(state: CrashState) -> None:
        found.setdefault(state.key(), state)

    for cut in cut_points(recording, window):
        after = cut >= window.end
        boundary = power.boundary(recording, cut)
        if power.model is Model.OPTIMISTIC:
            add(CrashState(cut, boundary, (), after, "prefix"))
            continue
        units, forced = power.in_flight(recording, cut)
        add(CrashState(cut, boundary, tuple(u for u in units if u in forced), after, "boundary"))
        for k in range(1, len(units) + 1):
            add(CrashState(cut, boundary, _with_forced(units[:k], units, forced), after, "prefix"))
        optional = [u for u in units if u not in forced]
        if len(optional) <= subset_limit:
            for size in range(len(optional) + 1):
                for chosen in itertools.combinations(optional, size):
                    add(CrashState(cut, boundary, _with_forced(chosen, units, forced), after, "subset"))
        else:
            for _ in range(sample_per_cut):
                chosen = [u for u in optional if rng.random() < 0.5]
                add(CrashState(cut, boundary, _with_forced(chosen, units, forced), after, "sample"))
    states = list(found.values())
    if power.model is Model.OPTIMISTIC:
        states += _optimistic_prefixes(recording, window, found)
    if len(states) > max_states:
        states = _bounded(states, max_states, rng)
    return sorted(states, key=lambda s: (s.cut, s.after_return, KIND_ORDER[s.kind], len(s.persisted), s.persisted))


def _with_forced(chosen, units: list[Unit], forced: set[Unit]) -> tuple[Unit, ...]:
    """``chosen`` plus every FUA unit issued before the last chosen one (it completed, so it is durable)."""
    chosen = set(chosen)
    last = max((units.index(u) for u in chosen), default=-1)
    keep = chosen | {u for u in units[:last + 1] if u in forced}
    return tuple(u for u in units if u in keep)


def _optimistic_prefixes(recording: Recording, window: Window, found: dict) -> list[CrashState]:
    """Optimistic: a cut after every write of the window (in-order prefixes), besides the flush cut points."""
    extra = []
    for entry in recording.entries[window.start:window.end]:
        if entry.is_write:
            state = CrashState(entry.index + 1, entry.index + 1, (), False, "prefix")
            if state.key() not in found:
                found[state.key()] = state
                extra.append(state)
    return extra


def _bounded(states: list[CrashState], limit: int, rng: random.Random) -> list[CrashState]:
    """At most ``limit`` states: first the two states right after the command returned (every in-flight write
    lost; every one kept), then in turn from three classes — boundary states (every in-flight write lost),
    states only a volatile cache can leave (subsets that drop an earlier write and keep a later one), in-order
    prefixes — each class in a seeded random order, so a small budget still covers all three."""
    last_cut = max(s.cut for s in states)
    at_return = [s for s in states if s.cut == last_cut and s.after_return]
    # after the return: every in-flight write lost, and every one kept (the optimistic model's state) — where a
    # reported success is most often lost or most visibly kept, so never left out
    must = [s for s in (min(at_return, key=lambda s: len(s.persisted), default=None),
                        max(at_return, key=lambda s: len(s.persisted), default=None)) if s is not None]
    must = list(dict.fromkeys(must))[:limit]
    rest = [s for s in states if s not in must]
    classes = [[s for s in rest if s.kind == "boundary"],
               [s for s in rest if s.kind in ("subset", "sample") and not _is_prefix(s, states)],
               [s for s in rest if s.kind == "prefix" or (s.kind != "boundary" and _is_prefix(s, states))]]
    for members in classes:
        rng.shuffle(members)
    keep: list[CrashState] = list(must)
    while len(keep) < limit and any(classes):
        for members in classes:
            if members and len(keep) < limit:
                keep.append(members.pop(0))
    return keep


def _is_prefix(state: CrashState, states: list[CrashState]) -> bool:
    return any(other.kind == "prefix" and other.key() == state.key() for other in states)
