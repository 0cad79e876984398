#!/usr/bin/env python3
"""Unpack throughput of a `.stone` against `zstd -d` on the same content, measured in the same run.

    .venv/bin/python bench/stone.py [--size-mb 200] [--level 18] [--repeat 5] [--workdir DIR] [--rebuild]

A package with SIZE MB of generated, realistically compressible content (a mix of file sizes like a real /usr)
is built once (and kept in ~/.cache/stonelab/bench for the next run; --rebuild builds it anew).  Then REPEAT
rounds, each running both, alternately, so that both see the same machine:
  * stonelab: read_stone + extract_assets — every record payload's checksum, every file's XXH3-128 and the
    Content checksum verified, every unique file written into a directory;
  * baseline: `zstd -d` of the very same Content frame into one file (no verification, no hashing).
Both unpack into WORKDIR, by default /dev/shm (tmpfs), so that what is measured is the unpacker and not the
disk; each run's output is removed before the next run starts (keeping them all would have later runs pay
for fresh memory or disk).  Prints best and median MB/s for both and the ratios (target: stonelab >= 0.7x
zstd -d), the filesystem's own share (the same files created from memory), and peak RSS.  The filesystem of
the work directory is named: on ext4 without a journal every create scans the inodes deleted in the last
minutes, which costs stonelab ~0.7 ms per file after the previous run's removal and zstd -d nothing.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_impl.stone import PackageSpec, build_package, read_stone  # noqa: E402
from reference_impl.stone.extract import extract_assets  # noqa: E402

WORDS = [bytes(f"{w}", "ascii") for w in (
    "usr lib share bin include pkgconfig locale LC_MESSAGES man doc license icons hicolor scalable apps "
    "x86_64 linux gnu elf section symbol relocation dynamic string table header version build release "
    "function return const static inline struct union enum typedef void int char long unsigned").split()]


def filesystem_of(path: Path) -> str:
    """The mount that holds ``path``: type, device and options, as /proc/self/mounts says."""
    best = ("?", "?", "?", "")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mountpoint, fstype, options = line.split()[:4]
        if path.resolve().is_relative_to(mountpoint) and len(mountpoint) >= len(best[1]):
            best = (device, mountpoint, fstype, options)
    journal_task = Path(f"/sys/fs/ext4/{Path(best[0]).name}/journal_task")
    no_journal = best[2] == "ext4" and journal_task.is_file() and journal_task.read_text().strip() == "<none>"
    journal = ", no journal" if no_journal else ""
    return f"{best[2]} on {best[1]} ({best[0]}{journal})"


def generated_file(rng: random.Random, size: int) -> bytes:
    """Text-and-binary mix that compresses roughly like real package content (about 3-4x)."""
    parts = []
    total = 0
    while total < size:
        if rng.random() < 0.25:
            chunk = rng.randbytes(rng.randint(64, 512))
        else:
            chunk = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64))) + b"\n"
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)[:size]


def make_tree(root: Path, total_bytes: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    written = 0
    count = 0
    while written < total_bytes:
        size = int(min(rng.lognormvariate(9.5, 2.0), 8 * 2**20, total_bytes - written)) or 1
        path = root / f"d{count % 97:02d}" / f"f{count:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generated_file(rng, size))
        written += size
        count += 1
    return count


def default_workdir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None  # None: the system temp dir


def reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh (Linux: clear_refs 5), so building the package does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, out: Path) -> float:
    start = time.perf_counter()
    fn(out)
    return time.perf_counter() - start


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def cached_package(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The generated package for these parameters, built once and kept for the next run."""
    cache = Path.home() / ".cache" / "stonelab" / "bench"
    cached = cache / f"stone-{args.size_mb}mb-level{args.level}.stone"
    if cached.is_file() and not args.rebuild:
        package = work / "bench.stone"
        shutil.copyfile(cached, package)
        return package, f"cached in {cached}"
    tree = work / "usr"
    make_tree(tree, args.size_mb * 2**20)
    started = time.perf_counter()
    package = build_package(tree, PackageSpec(name="bench", version="1"), work / "bench.stone", level=args.level)
    built = f"built in {time.perf_counter() - started:.1f} s"
    shutil.rmtree(tree)
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package, cached)
    return package, built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--level", type=int, default=18, help="zstd level of the generated package (upstream: 18)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=default_workdir(),
                        help="where to unpack (default: %(default)s, so that the unpacker is measured rather than "
                             "the disk; give a directory on a disk to measure that filesystem too)")
    parser.add_argument("--rebuild", action="store_true", help="build the package anew instead of the cached one")
    args = parser.parse_args()
    zstd = shutil.which("zstd")
    if not zstd:
        print("bench/stone.py: zstd not found (Debian package zstd; `make run` installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stonelab-bench-", dir=args.workdir))
    try:
        package, origin = cached_package(args, work)
        stone = read_stone(package)
        content = stone.content
        plain = content.plain_size
        frame = work / "content.zst"
        with open(package, "rb") as src, open(frame, "wb") as dst:
            src.seek(content.body_offset)
            remaining = content.stored_size
            while remaining:  # in pieces: peak RSS is to tell what unpacking needs, not this copy
                piece = src.read(min(remaining, 1 << 20))
                dst.write(piece)
                remaining -= len(piece)
        sizes = [e.size for e in stone.index]

        def ours(out: Path) -> None:
            extract_assets(read_stone(package), out)

        def baseline(out: Path) -> None:
            subprocess.run([zstd, "-d", "-q", "-f", "--long=31", str(frame), "-o", str(out)], check=True)

        def floor(out: Path) -> None:
            """Only the filesystem's share: create and write the same files from memory, no zstd, no hashing."""
            out.mkdir()
            blob = b"x" * max(sizes)
            for number, size in enumerate(sizes):
                with open(out / f"{number:032x}", "wb") as handle:
                    handle.write(blob[:size])

        timed(baseline, work / "warm")  # the page cache holds package and frame for every run that follows
        remove(work / "warm")
        subprocess.run(["sync"], check=False)
        peak_reset = reset_peak_rss()
        times: dict[str, list[float]] = {"zstd": [], "ours": [], "floor": []}
        for _round in range(args.repeat):
            for name, fn in (("zstd", baseline), ("ours", ours), ("floor", floor)):
                out = work / name
                times[name].append(timed(fn, out))
                remove(out)
                subprocess.run(["sync"], check=False)  # no run pays for the previous one's writeback
        best = {name: min(values) for name, values in times.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        mb = plain / 2**20
        peak = peak_rss_mib()
        print(f"package: {len(sizes)} files, {mb:.1f} MiB content, {package.stat().st_size / 2**20:.1f} MiB on disk "
              f"(zstd level {args.level}, {origin})")
        print(f"filesystem of the work directory: {filesystem_of(work)}")
        for name, label in (("zstd", "zstd -d (baseline)"), ("ours", "stonelab unpack")):
            print(f"{label + ':':20s} best {best[name]:.3f} s {mb / best[name]:8.1f} MiB/s   "
                  f"median {median[name]:.3f} s {mb / median[name]:8.1f} MiB/s")
        print(f"ratio (stonelab / zstd -d throughput): best {best['zstd'] / best['ours']:.2f}x, "
              f"median {median['zstd'] / median['ours']:.2f}x   target >= 0.70x")
        print(f"filesystem floor (create+write the same {len(sizes)} files from memory, one thread): "
              f"{best['floor']:.3f} s = {best['floor'] / best['ours']:.0%} of the stonelab time; zstd -d writes "
              "a single file")
        print(f"peak RSS of this process {'during the runs' if peak_reset else 'since it started'}: {peak:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
