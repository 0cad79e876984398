#!/usr/bin/env python3
"""Unpack throughput of a `.stone` against `zstd -d` on the same content, measured in the same run.

    .venv/bin/python bench/stone.py [--size-mb 200] [--level 18] [--repeat 3] [--workdir DIR]

A package with SIZE MB of generated, realistically compressible content (a mix of file sizes like a real /usr)
is built once.  Then, best of REPEAT runs each:
  * stonelab: read_stone + extract_assets — every payload checksum and every file's XXH3-128 verified, every
    unique file written into a directory;
  * baseline: `zstd -d` of the very same Content frame into one file (no verification, no hashing).
Prints MB/s for both and the ratio (target: stonelab >= 0.7x zstd -d), plus peak RSS.
"""
from __future__ import annotations

import argparse
import random
import resource
import shutil
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


def best_of(repeat: int, fn, work: Path) -> float:
    times = []
    for _ in range(repeat):
        shutil.rmtree(work / "ours", ignore_errors=True)
        shutil.rmtree(work / "floor", ignore_errors=True)
        (work / "plain").unlink(missing_ok=True)
        subprocess.run(["sync"], check=False)  # no run pays for the previous one's writeback
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--level", type=int, default=18, help="zstd level of the generated package (upstream: 18)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build and unpack (default: the system temp dir); try /dev/shm for tmpfs")
    args = parser.parse_args()
    zstd = shutil.which("zstd")
    if not zstd:
        print("bench/stone.py: zstd not found (Debian package zstd; `make run` installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stonelab-bench-", dir=args.workdir))
    try:
        tree = work / "usr"
        files = make_tree(tree, args.size_mb * 2**20)
        started = time.perf_counter()
        package = build_package(tree, PackageSpec(name="bench", version="1"), work / "bench.stone", level=args.level)
        build_s = time.perf_counter() - started
        shutil.rmtree(tree)
        stone = read_stone(package)
        content = stone.content
        plain = content.plain_size
        frame = work / "content.zst"
        with open(package, "rb") as src, open(frame, "wb") as dst:
            src.seek(content.body_offset)
            dst.write(src.read(content.stored_size))

        def ours() -> None:
            extract_assets(read_stone(package), work / "ours")

        sizes = [e.size for e in stone.index]

        def floor() -> None:
            """Only the filesystem's share: create and write the same files from memory, no zstd, no hashing."""
            out = work / "floor"
            out.mkdir()
            blob = b"x" * max(sizes)
            for number, size in enumerate(sizes):
                with open(out / f"{number:032x}", "wb") as handle:
                    handle.write(blob[:size])

        def baseline() -> None:
            subprocess.run([zstd, "-d", "-q", "-f", "--long=31", str(frame), "-o", str(work / "plain")],
                           check=True)

        baseline()  # warm the page cache for both
        t_zstd = best_of(args.repeat, baseline, work)
        t_ours = best_of(args.repeat, ours, work)
        t_floor = best_of(args.repeat, floor, work)
        mb = plain / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"package: {files} files, {mb:.1f} MiB content, {package.stat().st_size / 2**20:.1f} MiB on disk "
              f"(zstd level {args.level}, built in {build_s:.1f} s)")
        print(f"zstd -d (baseline): {t_zstd:.3f} s  {mb / t_zstd:8.1f} MiB/s")
        print(f"stonelab unpack:    {t_ours:.3f} s  {mb / t_ours:8.1f} MiB/s  (verified, {len(stone.index)} files "
              f"written)")
        print(f"ratio (stonelab / zstd -d throughput): {t_zstd / t_ours:.2f}x   target >= 0.70x")
        print(f"filesystem floor (create+write the same {len(sizes)} files from memory): {t_floor:.3f} s "
              f"= {t_floor / t_ours:.0%} of the stonelab time; zstd -d writes a single file")
        print(f"peak RSS of this process: {peak:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
