#!/usr/bin/env python3
"""Blit throughput on a real AerynOS-sized /usr against `cp -al` of the same tree, measured in the same run.

    .venv/bin/python bench/blit.py [--workdir DIR] [--limit N] [--repeat R] [--workers W]

The tree is every path below /usr in ../shared/fixtures/aerynos/filelists.json.zst (paths that are also the
parent of another path are dropped).  Contents are generated: the path's own bytes (so digests differ), one file
in 20 empty; files in bin/, sbin/, libexec/ and shared objects are 0755 (so they need mode variants), the rest
0644.  A store is built in WORKDIR (default /tmp, one filesystem for everything), then:

  * first blit: store -> ref/usr, creating the mode variants (a one-off cost per content; timed, reported);
  * best of REPEAT, alternating: `cp -al ref/usr cp/usr` (the baseline) and blit() HARDLINK -> out/usr with
    fsync=False as the transaction calls it, each followed by one syncfs, timed separately (the transaction does
    that syncfs itself).  The blit runs in a child process, which also reports its peak RSS.

Prints files/s for both, the ratio blit / cp -al (target <= 1.0) and the peak RSS (target < 500 MB).
The work dir is removed afterwards.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILELISTS = REPO.parent / "shared" / "fixtures" / "aerynos" / "filelists.json.zst"


# -- the tree ------------------------------------------------------------------------------------------------------
def usr_paths(limit: int | None) -> list[str]:
    import zstandard
    with open(FILELISTS, "rb") as handle:
        data = json.loads(zstandard.ZstdDecompressor().stream_reader(handle).read())
    paths = sorted({p[5:] for files in data.values() for p in files if p.startswith("/usr/") and len(p) > 5})
    parents = set()
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent and parent not in parents:
            parents.add(parent)
            parent = parent.rpartition("/")[0]
    paths = [p for p in paths if p not in parents]
    return paths[:limit] if limit else paths


def executable(path: str) -> bool:
    return path.startswith(("bin/", "sbin/", "libexec/")) or ".so" in path.rpartition("/")[2]


def build_store(paths: list[str], store: Path, listing: Path, workers: int = 4) -> tuple[int, int]:
    """Write one asset per path (content = the path) and the layout listing the child blit reads.

    Creating inodes is the slow part on this kind of machine, so folders and files are made by a few threads."""
    import xxhash

    from reference_impl.blit import asset_str
    from reference_impl.stone import EMPTY_DIGEST
    store_s = os.fspath(store)
    assets: list[tuple[str, bytes]] = []
    empty = 0
    with open(listing, "w", encoding="utf-8") as out:
        for i, path in enumerate(paths):
            mode = 0o755 if executable(path) else 0o644
            if i % 20 == 0:
                digest = EMPTY_DIGEST
                empty += 1
            else:
                data = path.encode()
                digest = xxhash.xxh3_128_intdigest(data)
                assets.append((asset_str(store_s, digest), data))
            out.write(f"{mode:o}\t{digest:x}\t{path}\n")
    assets.sort()
    folders = sorted({asset.rpartition("/")[0] for asset, _data in assets})
    by_top: dict[str, list[str]] = {}
    for folder in folders:
        by_top.setdefault(folder[len(store_s) + 1:len(store_s) + 3], []).append(folder)

    def make_folders(group: list[str]) -> None:
        for folder in group:
            os.makedirs(folder, exist_ok=True)

    def write(lo: int, hi: int) -> None:
        for asset, data in assets[lo:hi]:
            fd = os.open(asset, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
            os.write(fd, data)
            os.close(fd)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(make_folders, group) for group in by_top.values()]:
            future.result()
        for future in [pool.submit(write, lo, lo + 4096) for lo in range(0, len(assets), 4096)]:
            future.result()
    return len(paths), empty


def read_layout(listing: Path) -> list:
    from reference_impl.stone import LayoutEntry, LayoutType
    regular = LayoutType.REGULAR
    entries = []
    with open(listing, encoding="utf-8") as handle:
        for line in handle:
            mode, digest, path = line.rstrip("\n").split("\t", 2)
            entries.append(LayoutEntry(0, 0, 0o100000 | int(mode, 8), 0, regular, path, int(digest, 16)))
    return entries


# -- one timed blit, in a child process (its own peak RSS) ------------------------------------------------------
def child(listing: Path, store: Path, dest: Path, workers: int, fsync: bool) -> None:
    from reference_impl.blit import BlitOptions, BlitStrategy, blit
    entries = read_layout(listing)
    rss_before = peak_rss_kb()
    dest.mkdir(parents=True)
    started = time.perf_counter()
    report = blit(entries, store, dest, BlitOptions(strategy=BlitStrategy.HARDLINK, workers=workers, fsync=fsync))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "files": report.files, "linked": report.linked, "empty": report.empty,
                      "variants": report.variants, "directories": report.directories,
                      "strategy": report.strategy.value,
                      "rss_before_kb": rss_before,
                      "rss_peak_kb": peak_rss_kb()}))


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM).  ru_maxrss would also count the parent's RSS at fork (kept over exec)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(listing: Path, store: Path, dest: Path, workers: int, fsync: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(listing), str(store), str(dest),
                           str(workers), "1" if fsync else "0"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/blit.py: the blit child failed:\n{done.stderr}")
    return json.loads(done.stdout)


def syncfs_seconds(path: Path) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        started = time.perf_counter()
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        return time.perf_counter() - started
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


# -- main ----------------------------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        listing, store, dest, workers, fsync = sys.argv[2:7]
        child(Path(listing), Path(store), Path(dest), int(workers), fsync == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--limit", type=int, default=None, help="only the first N paths (sorted)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="blit threads (0: the blit's own choice)")
    args = parser.parse_args()
    if not FILELISTS.exists():
        print(f"bench/blit.py: {FILELISTS} is absent (../shared holds the real fixtures)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="stonelab-bench-blit-", dir=args.workdir))
    try:
        started = time.perf_counter()
        paths = usr_paths(args.limit)
        store, listing = work / "assets" / "v2", work / "layout.tsv"
        store.mkdir(parents=True)
        files, empty = build_store(paths, store, listing)
        print(f"tree: {files} files ({empty} empty, {sum(map(executable, paths))} mode 0755) from {FILELISTS.name}; "
              f"store built in {time.perf_counter() - started:.1f} s in {work}")
        del paths

        first = run_child(listing, store, work / "ref" / "usr", args.workers, True)
        print(f"first blit (creates {first['variants']} mode variants, then syncfs): {first['seconds']:.2f} s")
        syncfs_seconds(work)

        best_cp = best_blit = None
        for _ in range(args.repeat):
            remove(work / "cp")
            (work / "cp").mkdir()
            syncfs_seconds(work)
            t0 = time.perf_counter()
            subprocess.run(["cp", "-al", str(work / "ref" / "usr"), str(work / "cp" / "usr")], check=True)
            cp_s = time.perf_counter() - t0
            cp = (cp_s, syncfs_seconds(work))
            remove(work / "out")
            syncfs_seconds(work)
            result = run_child(listing, store, work / "out" / "usr", args.workers, False)
            result["syncfs"] = syncfs_seconds(work)
            print(f"  run: cp -al {cp[0]:.2f} s + syncfs {cp[1]:.2f} s | blit {result['seconds']:.2f} s "
                  f"+ syncfs {result['syncfs']:.2f} s")
            if best_cp is None or cp[0] < best_cp[0]:
                best_cp = cp
            if best_blit is None or result["seconds"] < best_blit["seconds"]:
                best_blit = result

        assert best_cp is not None and best_blit is not None
        n = best_blit["files"]
        cp_s, cp_sync = best_cp
        b_s, b_sync = best_blit["seconds"], best_blit["syncfs"]
        print(f"files: {n} ({best_blit['linked']} linked, {best_blit['empty']} empty created fresh), "
              f"{best_blit['directories']} directories, strategy {best_blit['strategy']}")
        print(f"cp -al : {cp_s:7.2f} s  {n / cp_s:10,.0f} files/s   (+ syncfs {cp_sync:.2f} s)")
        print(f"blit   : {b_s:7.2f} s  {n / b_s:10,.0f} files/s   (+ syncfs {b_sync:.2f} s)")
        print(f"ratio blit / cp -al: {b_s / cp_s:.2f}x (target <= 1.0); "
              f"with the syncfs on both: {(b_s + b_sync) / (cp_s + cp_sync):.2f}x")
        print(f"peak RSS of the blit process: {best_blit['rss_peak_kb'] / 1024:.0f} MB "
              f"(layout loaded: {best_blit['rss_before_kb'] / 1024:.0f} MB; target < 500 MB)")
    finally:
        remove(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
