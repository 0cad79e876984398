"""The power-loss model: what a disk holds after the power fails at a point of a recorded write sequence.

One class, :class:`PowerLoss`, answers that question for every part of the lab (enumeration, reproducers,
reports), so the model is stated once:

* ``volatile-cache`` (default) — a disk with a volatile write cache, as the virtio disk the guest sees
  (``write-cache=on``) and most real disks.  After a cut at log position ``cut`` the disk holds every write
  before the last completed FLUSH before ``cut`` (the *flush boundary*), every FUA write before ``cut``, and
  **any subset** of the other writes between the boundary and ``cut`` (*in flight*: completed to the cache, not
  yet flushed), in no particular order.  Units are whole requests (``granularity=request``) or single sectors
  of the log's sector size (``granularity=sector``: a request may be torn).  Of two overlapping writes that
  both persist, the later one wins (the cache holds the latest data of a sector).
* ``optimistic`` — the lab's former power cut (SIGKILL of QEMU): every write the guest submitted before the
  cut persists, in order, flushed or not; only the guest's own memory (page cache, unsubmitted journal) is lost.
  States are the in-order prefixes of the log.  It cannot show a missing FLUSH or a reordering; reports label
  its verdicts as optimistic.

Sources: the CrashMonkey paper (Mohan et al., OSDI '18, §3 "persistence model": writes between two flushes can
be reordered/dropped), Linux ``Documentation/block/writeback_cache_control.rst`` (REQ_PREFLUSH/REQ_FUA
semantics).  QEMU's virtio disk carries no FUA: Linux emulates a FUA write as write + flush, and QEMU's
blklogwrites never sets the FUA flag, so recorded FUA writes appear as a write followed by a FLUSH entry —
stricter than a real FUA (it also makes the earlier writes durable), i.e. it can only hide states, never invent
them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from lab.crash.logwrites import LogEntry, LogFlag, Recording


class Model(enum.StrEnum):
    VOLATILE_CACHE = "volatile-cache"
    OPTIMISTIC = "optimistic"


class Granularity(enum.StrEnum):
    REQUEST = "request"
    SECTOR = "sector"


@dataclass(frozen=True, order=True)
class Unit:
    """What may persist or not on its own: ``count`` sectors of entry ``entry`` from its sector ``first``."""

    entry: int
    first: int = 0
    count: int = 0  # 0: the whole request

    def label(self) -> str:
        return f"#{self.entry}" if not self.count else f"#{self.entry}[{self.first}+{self.count}]"


@dataclass(frozen=True)
class CrashState:
    """One state a cut can leave. ``cut``: entries ``< cut`` had completed when the power failed;
    ``boundary``: entries ``< boundary`` are on disk (the flush boundary; all of them for optimistic);
    ``persisted``: the in-flight units that reached the medium; ``after_return``: the operation under test had
    already returned when the power failed; ``kind``: boundary | prefix | subset | sample (how it was found)."""

    cut: int
    boundary: int
    persisted: tuple[Unit, ...]
    after_return: bool
    kind: str

    def key(self) -> tuple:
        return (self.boundary, self.persisted, self.after_return)

    def write_set(self) -> str:
        return " ".join(u.label() for u in self.persisted) or "-"


@dataclass(frozen=True)
class PowerLoss:
    """The power-loss model (see the module docstring) over one recording."""

    model: Model = Model.VOLATILE_CACHE
    granularity: Granularity = Granularity.REQUEST

    def describe(self) -> str:
        if self.model is Model.OPTIMISTIC:
            return ("optimistic (SIGKILL of QEMU): every submitted write survives in order; a missing FLUSH "
                    "and write reordering are invisible")
        return (f"volatile write cache: writes up to the last completed FLUSH and every FUA write survive, any "
                f"subset of the unflushed writes may ({self.granularity} granularity)")

    def boundary(self, recording: Recording, cut: int) -> int:
        """Index after the last FLUSH entry before ``cut`` (0 if none); ``cut`` itself for optimistic."""
        if self.model is Model.OPTIMISTIC:
            return cut
        for entry in reversed(recording.entries[:cut]):
            if entry.is_flush:
                return entry.index + 1
        return 0

    def in_flight(self, recording: Recording, cut: int) -> tuple[list[Unit], set[Unit]]:
        """(every unit written between the boundary and ``cut``, the ones that must persist: FUA writes)."""
        units: list[Unit] = []
        forced: set[Unit] = set()
        for entry in recording.entries[self.boundary(recording, cut):cut]:
            if not entry.is_write:
                continue
            pieces = self._units(entry)
            units += pieces
            if entry.flags & LogFlag.FUA:
                forced.update(pieces)
        return units, forced

    def _units(self, entry: LogEntry) -> list[Unit]:
        if self.granularity is Granularity.REQUEST or entry.nr_sectors == 1:
            return [Unit(entry.index)]
        return [Unit(entry.index, first, 1) for first in range(entry.nr_sectors)]

    def writes(self, recording: Recording, state: CrashState) -> list[tuple[LogEntry, int, int]]:
        """What to apply to the pre-recording image to build ``state``: (entry, first sector, sector count) in
        log order — every write before the boundary, then the persisted units."""
        entries = recording.entries
        out = [(e, 0, e.nr_sectors) for e in entries[:state.boundary] if e.is_write]
        for unit in sorted(state.persisted):
            entry = entries[unit.entry]
            out.append((entry, unit.first, unit.count or entry.nr_sectors))
        return out

    def worst_cut(self, recording: Recording) -> CrashState:
        """The state a power cut right after the last logged entry leaves when the cache loses all it may: the
        flush boundary plus the FUA writes after it (volatile-cache), or everything (optimistic)."""
        cut = len(recording.entries)
        units, forced = self.in_flight(recording, cut)
        return CrashState(cut, self.boundary(recording, cut), tuple(u for u in units if u in forced), False,
                          "boundary")

    def write_state(self, recording: Recording, state: CrashState, image: Path) -> None:
        """Apply ``state`` to ``image``, a raw copy of the disk as it was when the recording began (whole-disk
        offsets: the ESP and the GPT too).  Raises OSError when the image cannot be written."""
        with open(image, "r+b") as disk:
            for entry, first, count in self.writes(recording, state):
                disk.seek((entry.sector + first) * recording.sector_size)
                disk.write(recording.read(entry, first, count))

