#!/usr/bin/env python3
"""`make fuzz`: a long randomized campaign over the parsers of untrusted input.

Targets: the ``.stone`` reader (``read_stone`` + every file's digest), the GPT reader, the superblock probes (in
memory and on a file, FAT root directory included), scenario files (``lab.scenario.load_scenario``) and write
logs (``lab.crash.logwrites.read_log``, a crash reproducer's recording, every entry's data read back).  Inputs
are mutations of real seeds (packages built here and ``../shared/fixtures``, a GPT made by sfdisk, mkfs images,
``scenarios/*.yaml``): bit flips, interesting integers (0, 2^31, 2^63, 2^64-1, the file size, ...) written over
4/8-byte fields, truncation, junk appended, chunks duplicated or spliced; structure-aware where a checksum would
stop everything at the door (GPT CRC32s recomputed, a ``.stone`` record decompressed, mutated, recompressed and
its XXH3-64 fixed; YAML mutated as a document too).

The one accepted outcome for a bad input is a ``StonelabError`` (the one-line error of the CLI).  Any other
exception is a failure; an input running longer than ``--timeout`` seconds is a hang.  Each failure's input and
traceback are kept in ``<workdir>/failures/``.  Workers run with ``TMPDIR`` and the working directory inside the
work directory, and an audit hook (PEP 578) records every write the parsers attempt outside it (open for writing,
mkdir, rename, unlink, chmod, database connections): the campaign fails if there is any.

Prints progress (inputs tried, rate, per target, failures, hangs) and a summary; exits 1 on any failure, hang or
write outside the work directory.  Deterministic for a given ``--seed`` and ``--jobs``.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**32, 2**62,
               2**63 - 1, 2**63, 2**64 - 1)


class Hang(BaseException):
    """Raised by the alarm when one input runs too long (a BaseException so that no parser swallows it)."""


# -- mutations ------------------------------------------------------------------------------------------------------

def mutate_window(rng: random.Random, data: bytes, windows: tuple[tuple[int, int], ...]) -> bytes:
    """Mutate only one of ``windows`` (start, end) of ``data``, where the structures are, keeping the length:
    edits spread over a whole image would almost never touch the few hundred bytes a parser reads."""
    start, end = rng.choice(windows)
    if start >= len(data):
        return mutate_bytes(rng, data)
    piece = mutate_bytes(rng, data[start:end])
    piece = (piece + data[start + len(piece):end])[:end - start] if len(piece) < end - start else piece[:end - start]
    return data[:start] + piece + data[end:]


def mutate_bytes(rng: random.Random, data: bytes, max_size: int = 1 << 20) -> bytes:
    """1-4 random byte-level edits of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        choice = rng.randrange(9)
        if not buf:
            buf += rng.randbytes(rng.randrange(1, 64))
            continue
        at = rng.randrange(len(buf))
        if choice == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buf[at] = rng.randrange(256)
        elif choice in (2, 3):
            width = rng.choice((2, 4, 8))
            value = rng.choice(INTERESTING + (len(buf), len(buf) - 1, len(buf) // 512, at))
            fmt = rng.choice("<>") + {2: "H", 4: "I", 8: "Q"}[width]
            packed = struct.pack(fmt, value & ((1 << (8 * width)) - 1))
            buf[at:at + width] = packed[:max(0, len(buf) - at)]
        elif choice == 4:
            del buf[rng.randrange(len(buf)):]
        elif choice == 5:
            buf += rng.randbytes(rng.randrange(1, 256))
        elif choice == 6:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randrange(1, 512)]
            where = rng.randrange(len(buf) + 1)
            buf[where:where] = chunk
        elif choice == 7:
            end = min(len(buf), at + rng.randrange(1, 64))
            del buf[at:end]
        else:
            buf[at:at + 1] = bytes(rng.randrange(1, 32))
    return bytes(buf[:max_size])


# -- targets --------------------------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    seeds: list[bytes]
    suffix: str = ".bin"

    @property
    def seed_weights(self) -> list[float]:
        """Small seeds more often (1/sqrt(size)): more inputs per second, the large ones still reached."""
        return [1 / max(len(seed), 1) ** 0.5 for seed in self.seeds]

    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        return mutate_bytes(rng, seed)

    def prepare(self) -> None:
        """Import what ``run`` needs, before the hang alarm is armed (a cold import can take seconds)."""

    def run(self, path: Path, data: bytes) -> None:
        raise NotImplementedError


class StoneTarget(Target):
    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        if rng.random() < 0.5:
            structured = mutate_stone_record(rng, seed)
            if structured is not None:
                return structured
        return mutate_bytes(rng, seed)

    def prepare(self) -> None:
        import reference_impl.stone  # noqa: F401

    def run(self, path: Path, data: bytes) -> None:
        from reference_impl.stone import read_stone
        from reference_impl.stone.model import FileType
        from reference_impl.stone.repository import indexed_path
        stone = read_stone(path)
        if stone.index:
            stone.verify_content()
        if stone.file_type is FileType.REPOSITORY:    # a stone.index: every entry's URI and hash
            for meta in stone.metas:
                indexed_path(path, meta.name, meta.uri, meta.hash)


def mutate_stone_record(rng: random.Random, data: bytes) -> bytes | None:
    """Decompress one payload, mutate its plain bytes (or header fields), recompress and fix the checksum, so
    that the record decoders (not just the checksum) see the damage."""
    import xxhash
    import zstandard

    from reference_impl.stone.reader import PAYLOAD_HEADER
    from reference_impl.stone.model import HEADER_SIZE, PAYLOAD_HEADER_SIZE
    payloads, offset = [], HEADER_SIZE
    while offset + PAYLOAD_HEADER_SIZE <= len(data):
        fields = list(PAYLOAD_HEADER.unpack_from(data, offset))
        end = offset + PAYLOAD_HEADER_SIZE + fields[0]
        if end > len(data):
            return None
        payloads.append((fields, data[offset + PAYLOAD_HEADER_SIZE:end]))
        offset = end
    if not payloads:
        return None
    pick = rng.randrange(len(payloads))
    fields, stored = payloads[pick]
    if rng.random() < 0.25:   # a header field: plain_size, num_records, version, kind or compression
        index = rng.choice((1, 3, 4, 5, 6))
        limit = {1: 2**64, 3: 2**32, 4: 2**16, 5: 2**8, 6: 2**8}[index]
        fields[index] = rng.choice(INTERESTING + (rng.randrange(limit),)) % limit
    else:
        plain = stored
        if fields[6] == 2:
            try:
                plain = zstandard.ZstdDecompressor().decompress(stored, max_output_size=1 << 24)
            except zstandard.ZstdError:
                return None
        plain = mutate_bytes(rng, plain)
        if rng.random() < 0.8:
            fields[1] = len(plain)
        stored = zstandard.ZstdCompressor(level=1).compress(plain) if fields[6] == 2 else plain
        fields[0] = len(stored)
    fields[2] = xxhash.xxh3_64_digest(stored)
    payloads[pick] = (fields, stored)
    out = bytearray(data[:HEADER_SIZE])
    for header, body in payloads:
        out += PAYLOAD_HEADER.pack(*header) + body
    return bytes(out)


class GptTarget(Target):
    # Protective MBR, header, the first entries.
    WINDOWS = ((0x1B0, 0x200), (512, 512 + 96), (1024, 1024 + 4 * 128))

    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        seed = seed[:64 * 1024]
        data = bytearray(mutate_window(rng, seed, self.WINDOWS) if rng.random() < 0.7 else mutate_bytes(rng, seed))
        if rng.random() < 0.6 and len(data) >= 1024 + 128:
            fix_gpt_crcs(data)
        return bytes(data)

    def prepare(self) -> None:
        import reference_impl.boot.gpt  # noqa: F401
        import reference_impl.boot.superblock  # noqa: F401

    def run(self, path: Path, data: bytes) -> None:
        from reference_impl.boot.gpt import find_boot_partition, read_gpt
        from reference_impl.boot.superblock import probe
        os.truncate(path, max(len(data), 24 * 1024 * 1024))   # sparse: the partitions lie inside the disk
        disk = read_gpt(path)
        find_boot_partition(disk, path.parent / "no-efivars")
        for part in disk.partitions[:4]:
            probe(path, part.offset)


def fix_gpt_crcs(data: bytearray) -> None:
    """Recompute the entry-array and header CRC32s of a 512-byte-sector GPT in place (when it says 128-byte
    entries starting at LBA 2), so that the checks behind them are reached."""
    size = int.from_bytes(data[512 + 12:512 + 16], "little")
    if not 92 <= size <= 512:
        return
    count = min(int.from_bytes(data[512 + 80:512 + 84], "little"), 256)
    if int.from_bytes(data[512 + 84:512 + 88], "little") == 128:
        data[512 + 88:512 + 92] = zlib.crc32(bytes(data[1024:1024 + count * 128])).to_bytes(4, "little")
    data[512 + 16:512 + 20] = bytes(4)
    data[512 + 16:512 + 20] = zlib.crc32(bytes(data[512:512 + size])).to_bytes(4, "little")


class SuperblockTarget(Target):
    # FAT boot sector, xfs and LUKS headers; ext2/3/4 and f2fs superblocks; btrfs' superblock.
    WINDOWS = ((0, 0x200), (0x400, 0x500), (0x10000, 0x10300))

    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        return mutate_window(rng, seed, self.WINDOWS) if rng.random() < 0.7 else mutate_bytes(rng, seed)

    def prepare(self) -> None:
        import reference_impl.boot.superblock  # noqa: F401

    def run(self, path: Path, data: bytes) -> None:
        from reference_impl.boot.superblock import probe, probe_bytes
        probe_bytes(data[:0x11000])
        probe(path)


class ScenarioTarget(Target):
    suffix = ".yaml"

    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        if rng.random() < 0.5:
            return mutate_yaml_document(rng, seed)
        return mutate_bytes(rng, seed, 1 << 16)

    def prepare(self) -> None:
        import lab.scenario  # noqa: F401

    def run(self, path: Path, data: bytes) -> None:
        from lab.scenario import load_scenario
        load_scenario(path)


class RecordingTarget(Target):
    """A dm-log-writes write log (a crash reproducer's recording): the super block and entry headers sit at
    sector boundaries; every entry's data is read back, over a 64 KiB recorded disk."""
    WINDOWS = ((0, 32), (512, 544), (1536, 1568), (2048, 2080), (3072, 3104))
    DISK_BYTES = 64 * 1024

    def mutate(self, rng: random.Random, seed: bytes) -> bytes:
        return mutate_window(rng, seed, self.WINDOWS) if rng.random() < 0.7 else mutate_bytes(rng, seed)

    def prepare(self) -> None:
        import lab.crash.logwrites  # noqa: F401

    def run(self, path: Path, data: bytes) -> None:
        from lab.crash.logwrites import read_log
        recording = read_log(path, disk_bytes=self.DISK_BYTES)
        for entry in recording.entries:
            recording.read(entry)
        recording.position(len(data))


def recording_seed() -> bytes:
    """A log as QEMU's blklogwrites writes it: write (2 sectors), flush, FUA write, discard, uncounted write."""
    def entry(sector: int, count: int, flags: int, fill: bytes) -> bytes:
        head = struct.pack("<QQQQ", sector, count, flags, 0).ljust(512, b"\0")
        return head + (b"" if flags & 4 else fill * (count * 512))
    body = entry(8, 2, 0, b"a") + entry(0, 0, 1, b"") + entry(16, 1, 2, b"b") + entry(24, 8, 4, b"")
    return struct.pack("<QQQI", 0x6A736677736872, 1, 4, 512).ljust(512, b"\0") + body + entry(40, 1, 0, b"c")


YAML_VALUES = (None, True, 0, -1, 2**64, 1.5, "", "x", "../../etc/passwd", "/abs", "a" * 300, [], {}, [None],
               {"x": None}, ["install"], {"install": ["x"]}, "*", "previous", "\0", "é")


def mutate_yaml_document(rng: random.Random, seed: bytes) -> bytes:
    """Parse the YAML seed, replace/delete/add a random node, dump it again."""
    import yaml
    try:
        doc = yaml.safe_load(seed)
    except yaml.YAMLError:
        return seed
    for _ in range(rng.choice((1, 1, 2, 3))):
        doc = _mutate_node(rng, doc, depth=0)
    return yaml.safe_dump(doc, allow_unicode=True).encode()


def _mutate_node(rng: random.Random, node: object, depth: int) -> object:
    if isinstance(node, dict) and node and rng.random() < 0.8 and depth < 6:
        key = rng.choice(list(node))
        action = rng.randrange(4)
        if action == 0:
            del node[key]
        elif action == 1:
            node[rng.choice((f"{key}x", "unknown", 1, None))] = rng.choice(YAML_VALUES)
        else:
            node[key] = _mutate_node(rng, node[key], depth + 1)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8 and depth < 6:
        at = rng.randrange(len(node))
        action = rng.randrange(4)
        if action == 0:
            del node[at]
        elif action == 1:
            node.insert(at, rng.choice(YAML_VALUES))
        else:
            node[at] = _mutate_node(rng, node[at], depth + 1)
        return node
    return rng.choice(YAML_VALUES)


# -- seeds ----------------------------------------------------------------------------------------------------------

def build_seeds(work: Path) -> dict[str, list[bytes]]:
    """Real inputs to mutate: built here (packages, a GPT disk, mkfs images) and from ../shared/fixtures."""
    seeds: dict[str, list[bytes]] = {"stone": [], "gpt": [], "superblock": [], "scenario": [],
                                     "recording": [recording_seed()]}
    from reference_impl.stone import PackageSpec, build_package_from_files
    spec = PackageSpec(name="fuzz", version="1", release=1, summary="fuzz seed", license=["MPL-2.0"],
                       depends=["soname(libc.so.6(x86_64))"], provides=["binary(fuzz)"], conflicts=[],
                       owners={}, modes={"bin/fuzz": 0o755})
    built = build_package_from_files({"bin/fuzz": "#!/bin/sh\necho fuzz\n", "share/fuzz/a": "a" * 300,
                                      "share/fuzz/empty": "", "lib/libf.so.1": bytes(range(256)) * 4},
                                     spec, work / "seed.stone", symlinks={"bin/f": "fuzz"}, level=3)
    seeds["stone"].append(built.read_bytes())
    from reference_impl.stone import write_repository_index
    seeds["stone"].append(write_repository_index(built.parent).read_bytes())
    fixtures = PROJECT.parent / "shared" / "fixtures"
    for path in sorted((fixtures / "aerynos" / "stones").glob("*.stone")):
        if path.stat().st_size <= 256 * 1024:
            seeds["stone"].append(path.read_bytes())
    if shutil.which("sfdisk"):
        disk = work / "seed-gpt.img"
        disk.write_bytes(b"")
        os.truncate(disk, 24 * 1024 * 1024)
        subprocess.run(["sfdisk", "-q", str(disk)], check=True, capture_output=True, input=(
            b"label: gpt\nstart=2048, size=8192, type=U, name=esp\nstart=10240, size=16384, type=L, name=root\n"
            b"start=26624, size=4096, type=BC13C2FF-59E6-4262-A352-B275FD6F7172, name=xbootldr\n"))
        seeds["gpt"].append(disk.read_bytes()[:64 * 1024])
    import zstandard
    for path in sorted((fixtures / "superblock").glob("*.img.zst")):
        with open(path, "rb") as src:
            image = zstandard.ZstdDecompressor().stream_reader(src).read(0x11000 + 512 * 1024)
        seeds["superblock"].append(image)
    for fat in ("12", "16", "32"):
        if shutil.which("mkfs.vfat"):
            img = work / f"seed-fat{fat}.img"
            img.write_bytes(b"")
            os.truncate(img, {"12": 2, "16": 16, "32": 40}[fat] * 1024 * 1024)
            subprocess.run(["mkfs.vfat", "-F", fat, "-n", "FUZZLABEL", str(img)], check=True, capture_output=True)
            seeds["superblock"].append(img.read_bytes()[:0x11000 + 512 * 1024])
    for path in sorted((PROJECT / "scenarios").glob("*.yaml")):
        seeds["scenario"].append(path.read_bytes())
    return {name: values for name, values in seeds.items() if values}


TARGET_TYPES = {"stone": StoneTarget, "gpt": GptTarget, "superblock": SuperblockTarget, "scenario": ScenarioTarget,
                "recording": RecordingTarget}
# Share of the inputs per target: YAML parsing is pure Python and ten times slower than the binary parsers.
WEIGHTS = {"stone": 3, "gpt": 3, "superblock": 3, "scenario": 1, "recording": 2}


# -- the campaign ---------------------------------------------------------------------------------------------------

@dataclass
class Stats:
    inputs: int = 0
    per_target: collections.Counter = field(default_factory=collections.Counter)
    refused: int = 0              # StonelabError: the accepted outcome for bad input
    failures: dict[str, str] = field(default_factory=dict)   # signature -> saved input
    failure_count: int = 0
    failures_per_target: collections.Counter = field(default_factory=collections.Counter)
    hangs: int = 0
    outside: set[str] = field(default_factory=set)   # paths written outside the work directory
    stopped_early: bool = False                      # --duration reached, or SIGINT/SIGTERM

    def merge(self, other: "Stats") -> None:
        self.inputs += other.inputs
        self.per_target.update(other.per_target)
        self.refused += other.refused
        self.failures.update(other.failures)
        self.failure_count += other.failure_count
        self.failures_per_target.update(other.failures_per_target)
        self.hangs += other.hangs
        self.outside |= other.outside
        self.stopped_early |= other.stopped_early


def _signature(target: str, err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{target} {type(err).__name__} at {where}"


def _on_alarm(_signum, _frame) -> None:
    raise Hang()


def run_worker(worker: int, count: int, seed: int, seeds: dict[str, list[bytes]], work: Path, timeout: float,
               progress_every: float, targets: list[str] | None = None, target_types: dict | None = None,
               stop_at: float | None = None) -> Stats:
    """Try ``count`` inputs (fewer when the wall clock passes ``stop_at``, a ``time.time()``, or on SIGINT/
    SIGTERM); return the statistics.  Never raises for what an input does."""
    rng = random.Random(f"{seed}:{worker}")
    types = target_types or TARGET_TYPES
    names = [n for n in (targets or list(seeds)) if n in seeds]
    chosen = {name: types[name](name, seeds[name]) for name in names}
    for target in chosen.values():
        target.prepare()
    scratch = work / f"worker-{worker}"
    scratch.mkdir(parents=True, exist_ok=True)
    (work / "failures").mkdir(exist_ok=True)
    os.chdir(scratch)
    stats = Stats()
    guard = WriteGuard(work)
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    stop = _StopFlag()
    previous_term = signal.signal(signal.SIGTERM, stop.set)
    previous_int = signal.signal(signal.SIGINT, stop.set)
    started = time.monotonic()
    try:
        _loop(count, names, chosen, rng, scratch, work, timeout, progress_every, stats, guard, worker, started,
              lambda: stop.value or (stop_at is not None and time.time() >= stop_at))
    finally:
        guard.on = False
        signal.signal(signal.SIGALRM, previous_handler)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    stats.outside = guard.outside
    return stats


class _StopFlag:
    """Set by SIGINT/SIGTERM: the worker finishes the input at hand and reports what it has."""

    def __init__(self) -> None:
        self.value = False

    def set(self, _signum, _frame) -> None:
        self.value = True


def _loop(count, names, chosen, rng, scratch, work, timeout, progress_every, stats, guard, worker, started,
          should_stop) -> None:
    from stonelab.errors import StonelabError
    last = started
    weights = [WEIGHTS.get(name, 1) for name in names]
    for n in range(count):
        if n % 64 == 0 and should_stop():
            stats.stopped_early = True
            break
        target = chosen[rng.choices(names, weights)[0]]
        seed = rng.choices(target.seeds, target.seed_weights)[0]
        try:
            data = target.mutate(rng, seed)
        except Exception:   # noqa: BLE001 -- a structure-aware mutator tripping (e.g. on a self-referring YAML
            data = mutate_bytes(rng, seed)   # alias) falls back to byte edits rather than end the campaign
        path = scratch / f"input{target.suffix}"
        path.write_bytes(data)
        stats.inputs += 1
        stats.per_target[target.name] += 1
        signal.setitimer(signal.ITIMER_REAL, timeout)
        guard.on = True
        try:
            target.run(path, data)
        except StonelabError:
            stats.refused += 1
        except Hang as err:
            stats.hangs += 1
            _keep(work, target.name, data, f"hang (> {timeout} s)\n", stats, f"{target.name} hang", err)
        except (Exception, RecursionError, MemoryError) as err:   # noqa: BLE001 -- every other kind is a finding
            stats.failure_count += 1
            stats.failures_per_target[target.name] += 1
            _keep(work, target.name, data, "".join(traceback.format_exception(err)), stats,
                  _signature(target.name, err), err)
        finally:
            guard.on = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        now = time.monotonic()
        if progress_every and now - last >= progress_every:
            last = now
            print(f"fuzz[{worker}]: {stats.inputs} inputs ({stats.inputs / (now - started):.0f}/s), "
                  f"{stats.failure_count} failures, {stats.hangs} hangs", flush=True)


def _keep(work: Path, target: str, data: bytes, text: str, stats: Stats, signature: str, err: BaseException) -> None:
    if signature in stats.failures:
        return
    name = f"{target}-{hashlib.sha256(data).hexdigest()[:16]}"
    (work / "failures" / f"{name}.input").write_bytes(data)
    (work / "failures" / f"{name}.txt").write_text(f"{signature}\n{text}")
    stats.failures[signature] = str(work / "failures" / f"{name}.input")
    print(f"fuzz: FAILURE {signature}: {str(err)[:200]!r} (input kept as {name}.input)", flush=True)


def _worker_entry(args: tuple, queue) -> None:
    try:
        queue.put(run_worker(*args))
    except BaseException as err:   # noqa: BLE001 -- reported by the parent
        queue.put(err)


WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "os.chown", "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree",
                "shutil.copyfile", "shutil.move", "sqlite3.connect"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class WriteGuard:
    """Records every path a Python-level write (open for writing, mkdir, rename, unlink, chmod, a database
    connection, ...) touches outside ``allowed``, through an audit hook (PEP 578) active while ``on``; this sees
    the workers' own calls only, unlike a snapshot that other processes on the machine would disturb."""

    def __init__(self, allowed: Path):
        self.allowed = str(allowed.resolve()) + os.sep
        self.outside: set[str] = set()
        self.on = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool((flags or 0) & WRITE_FLAGS))
        elif event in WRITE_EVENTS:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if not (full + os.sep).startswith(self.allowed) and full != ":memory:":
                self.outside.add(full)


def campaign(inputs: int, jobs: int, seed: int, work: Path, timeout: float, progress_every: float,
             targets: list[str] | None = None, target_types: dict | None = None,
             stop_at: float | None = None) -> tuple[Stats, list[str], float]:
    """Run the campaign over ``jobs`` processes (this one and ``jobs - 1`` extra).  Returns the merged stats,
    the paths written or changed outside ``work``, and the seconds it took."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    (work / "seeds").mkdir(exist_ok=True)
    seeds = build_seeds(work / "seeds")
    saved_tmpdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(work / "tmp")
    tempfile.tempdir = None
    try:
        return _run_campaign(inputs, jobs, seed, work, timeout, progress_every, targets, target_types, stop_at, seeds)
    finally:  # the caller (a test, in-process) gets its own temporary directory back
        if saved_tmpdir[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_tmpdir[0]
        tempfile.tempdir = saved_tmpdir[1]


def _run_campaign(inputs: int, jobs: int, seed: int, work: Path, timeout: float, progress_every: float,
                  targets: list[str] | None, target_types: dict | None, stop_at: float | None,
                  seeds: dict) -> tuple[Stats, list[str], float]:
    share = [inputs // jobs + (1 if i < inputs % jobs else 0) for i in range(jobs)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_worker_entry, args=((i, share[i], seed, seeds, work, timeout, progress_every,
                                                             targets, target_types, stop_at), queue))
                for i in range(1, jobs)]
    started = time.monotonic()
    cwd = os.getcwd()
    for child in children:
        child.start()
    try:
        total = run_worker(0, share[0], seed, seeds, work, timeout, progress_every, targets, target_types, stop_at)
    except BaseException:
        for child in children:
            child.terminate()
            child.join()
        raise
    finally:
        os.chdir(cwd)
    for _ in children:
        result = queue.get()
        if isinstance(result, BaseException):
            raise result
        total.merge(result)
    for child in children:
        child.join()
    elapsed = time.monotonic() - started
    outside = sorted(total.outside)
    return total, outside, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs to try in all (default 1,000,000)")
    parser.add_argument("--jobs", type=int, default=2, help="processes: this one and JOBS-1 extra (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: new each run, printed)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before one input counts as a hang")
    parser.add_argument("--target", action="append", choices=sorted(TARGET_TYPES), help="only these targets")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work directory (default: a new one in /dev/shm, else in the temp dir; kept when "
                             "something failed)")
    parser.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds even before --inputs (the summary says so)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    # tmpfs by default: every input is a file written and replaced, which a disk filesystem makes the bottleneck.
    shm = Path("/dev/shm")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stonelab-fuzz-", dir=shm if shm.is_dir() else None))
    print(f"fuzz: {args.inputs} inputs, {args.jobs} processes, seed {seed}, work directory {work}", flush=True)
    stop_at = time.time() + args.duration if args.duration else None
    stats, outside, elapsed = campaign(args.inputs, max(1, args.jobs), seed, work, args.timeout, args.progress,
                                       args.target, stop_at=stop_at)
    if stats.stopped_early:
        print(f"fuzz: stopped early (--duration or a signal): {stats.inputs} of {args.inputs} inputs tried")
    print(f"fuzz: {stats.inputs} inputs in {elapsed:.0f} s ({stats.inputs / max(elapsed, 1e-9):.0f}/s): "
          + ", ".join(f"{name} {count}" for name, count in sorted(stats.per_target.items())))
    print(f"fuzz: {stats.refused} refused with a StonelabError, {stats.failure_count} other exceptions "
          f"({len(stats.failures)} distinct), {stats.hangs} hangs, {len(outside)} paths written outside {work}")
    print("fuzz: other exceptions per target: " + ", ".join(
        f"{name} {stats.failures_per_target[name]}" for name in sorted(stats.per_target)))
    for signature, kept in sorted(stats.failures.items()):
        print(f"fuzz:   {signature} -> {kept}")
    for path in outside[:20]:
        print(f"fuzz:   written outside the work directory: {path}")
    bad = stats.failure_count or stats.hangs or outside
    if not bad and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
