"""Read a write log in the dm-log-writes format, as QEMU's ``blklogwrites`` driver writes it.

Layout (little-endian; sources: Linux ``drivers/md/dm-log-writes.c`` and
``Documentation/admin-guide/device-mapper/log-writes.rst``, QEMU ``block/blklogwrites.c``):

* sector 0: ``struct log_write_super {u64 magic = 0x6a736677736872; u64 version = 1; u64 nr_entries;
  u32 sectorsize}``;
* from sector 1 on, one entry per request: a header sector ``struct log_write_entry {u64 sector;
  u64 nr_sectors; u64 flags; u64 data_len}`` followed by ``nr_sectors`` sectors of data — none for a discard
  or a flush.  ``sector``/``nr_sectors`` count ``sectorsize`` units of the recorded disk.

QEMU writes the super block on every flush and every ``log-super-update-interval`` entries, so entries appended
after the last flush are in the file but not counted in ``nr_entries``.  The reader therefore takes the counted
entries (a missing or malformed one is an error) and then every complete, well-formed entry after them.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path

from stonelab.errors import StonelabError

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")


class LogFlag(enum.IntFlag):
    FLUSH = 1
    FUA = 2
    DISCARD = 4
    MARK = 8
    METADATA = 16  # kernel dm-log-writes only


class RecordingError(StonelabError):
    """A write log that cannot be trusted: one line naming the file and the byte offset."""


@dataclass(frozen=True)
class LogEntry:
    """One logged request. ``index`` counts entries from 0; ``sector``/``nr_sectors`` in the log's sector size;
    ``offset`` is the header's byte offset in the log, ``data_offset`` the byte offset of its data (if any)."""

    index: int
    sector: int
    nr_sectors: int
    flags: LogFlag
    offset: int
    data_offset: int

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & LogFlag.FLUSH)

    @property
    def is_write(self) -> bool:
        """A request that changes the disk: a write (also write-zeroes) or a discard."""
        return self.nr_sectors > 0 and not self.flags & LogFlag.MARK

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & LogFlag.DISCARD)

    def describe(self) -> str:
        names = "|".join(f.name for f in LogFlag if f in self.flags) or "WRITE"
        if not self.nr_sectors:
            return f"#{self.index} {names}"
        return f"#{self.index} {names} sector {self.sector} +{self.nr_sectors}"


@dataclass(frozen=True)
class Recording:
    """A parsed log: ``sector_size`` in bytes, ``counted`` entries the super block vouches for, all ``entries``."""

    path: Path
    sector_size: int
    counted: int
    entries: tuple[LogEntry, ...]

    def read(self, entry: LogEntry, first: int = 0, count: int | None = None) -> bytes:
        """The data of ``entry`` (or of ``count`` of its sectors from sector ``first``); zeros for a discard."""
        count = entry.nr_sectors - first if count is None else count
        if entry.is_discard:
            return bytes(count * self.sector_size)
        with open(self.path, "rb") as log:
            log.seek(entry.data_offset + first * self.sector_size)
            return log.read(count * self.sector_size)

    def position(self, log_bytes: int) -> int:
        """How many entries were complete when the log file was ``log_bytes`` long (a timeline mark)."""
        done = 0
        for entry in self.entries:
            end = entry.data_offset + (0 if entry.is_discard else entry.nr_sectors * self.sector_size)
            if end > log_bytes:
                break
            done += 1
        return done


MAX_OFFSET = (1 << 63) - 1   # the largest file offset (off_t)


def read_log(path: Path, sector_size_hint: int = 512, disk_bytes: int | None = None) -> Recording:
    """Parse the write log at ``path``. Raises RecordingError (file, offset, problem) on anything malformed.

    A super block of zeros is a log QEMU has not yet summarised (it writes the super block only on a flush or
    every 4096 entries — a guest that never flushes leaves it empty): its entries are read as the uncounted
    tail, in units of ``sector_size_hint`` (QEMU's ``log-sector-size``, default 512).  Every entry's sectors
    must lie on the recorded disk (``disk_bytes``, its size, when the caller knows it; else within a file
    offset): a write or discard past its end would grow the image, or ask for more memory than there is."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as log:
            head = log.read(SUPER.size)
    except OSError as err:
        raise RecordingError(f"{path}: cannot read the write log ({err.strerror})") from None
    if len(head) < SUPER.size:
        raise RecordingError(f"{path}: offset 0: {size} bytes, too short for a log super block")
    magic, version, counted, sector_size = SUPER.unpack(head)
    if head == bytes(SUPER.size) and size > sector_size_hint:
        magic, version, counted, sector_size = MAGIC, VERSION, 0, sector_size_hint
    if magic != MAGIC:
        raise RecordingError(f"{path}: offset 0: bad magic {magic:#x} (not a dm-log-writes log)")
    if version != VERSION:
        raise RecordingError(f"{path}: offset 8: unsupported log version {version}")
    if sector_size < 512 or sector_size & (sector_size - 1) or sector_size >= 1 << 24:
        raise RecordingError(f"{path}: offset 24: invalid sector size {sector_size}")
    entries: list[LogEntry] = []
    offset = sector_size
    known = LogFlag.FLUSH | LogFlag.FUA | LogFlag.DISCARD | LogFlag.MARK | LogFlag.METADATA
    with open(path, "rb") as log:
        while True:
            counted_entry = len(entries) < counted
            log.seek(offset)
            raw = log.read(ENTRY.size)
            if len(raw) < ENTRY.size:
                if counted_entry:
                    raise RecordingError(f"{path}: offset {offset}: entry {len(entries)} of {counted} is missing "
                                         "(truncated log)")
                break
            sector, nr_sectors, flags, _data_len = ENTRY.unpack(raw)
            data_bytes = 0 if flags & LogFlag.DISCARD else nr_sectors * sector_size
            problem = None
            if flags & ~int(known):
                problem = f"entry {len(entries)} has unknown flags {flags:#x}"
            elif offset + sector_size + data_bytes > size:
                problem = f"entry {len(entries)} needs {data_bytes} data bytes past the end of the file"
            elif (sector + nr_sectors) * sector_size > (MAX_OFFSET if disk_bytes is None else disk_bytes):
                problem = (f"entry {len(entries)} covers sectors {sector}+{nr_sectors}, past the end of the "
                           f"{'recorded disk' if disk_bytes is None else f'{disk_bytes}-byte recorded disk'}")
            if problem:
                if counted_entry:
                    raise RecordingError(f"{path}: offset {offset}: {problem}")
                break  # the uncounted tail ends at the first entry that is not whole
            if not counted_entry and not (nr_sectors or flags):
                break  # zeros: preallocated space, not an entry
            entries.append(LogEntry(len(entries), sector, nr_sectors, LogFlag(flags), offset, offset + sector_size))
            offset += sector_size + data_bytes
    return Recording(path, sector_size, counted, tuple(entries))
