"""Observe a system root as data: the /usr tree, the state marker, staging, the store, what lies outside /usr.

Runs wherever the root is — in the lab process for the host target, as ``python -m lab.probe ROOT`` inside a
guest for the VM target — and prints JSON, so invariants are judged the same way on both.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import stat
import sys
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.bootprobe import observe_boot
from reference_impl.stone import EMPTY_DIGEST
from reference_impl.store import hash_file as store_hash

ROOT_LINKS = ("bin", "sbin", "lib", "lib64", "lib32")


@dataclass
class Observation:
    # rel path -> ["file", digest hex, mode, "uid:gid"] | ["symlink", dest]
    usr: dict[str, list] = field(default_factory=dict)
    usr_is_symlink: str | None = None
    state_id: str | None = None
    db_states: list[int] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)  # ids under .moss/root/ with a usr tree
    staging: list[str] = field(default_factory=list)  # entries left in .moss/root/staging
    outside: dict[str, list] = field(default_factory=dict)  # everything outside /usr and /.moss
    bad_assets: list[str] = field(default_factory=list)
    partial_assets: list[str] = field(default_factory=list)
    missing_assets: list[str] = field(default_factory=list)  # referenced by a state's layout, not in the store
    assets: int = 0
    # what the state database records for the active state: rel path -> ["file", digest hex] | ["symlink", dest]
    recorded_usr: dict[str, list] | None = None
    shared_empty_files: list[str] = field(default_factory=list)  # empty files in /usr sharing one inode (#372)
    boot: dict | None = None  # the ESP as the firmware would see it (observe_boot), when the target has a disk


def hash_file(path: Path) -> str:
    return f"{store_hash(path) or 0:032x}"


def walk(base: Path) -> dict[str, list]:
    """Regular files and symlinks below ``base`` (not following links), keyed by relative path."""
    tree: dict[str, list] = {}
    if not base.is_dir():
        return tree
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            full = here / name
            rel = full.relative_to(base).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ["symlink", os.readlink(full)]
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = ["file", hash_file(full), f"{stat.S_IMODE(st.st_mode):04o}", f"{st.st_uid}:{st.st_gid}"]
            else:
                tree[rel] = ["other", f"{stat.S_IFMT(st.st_mode):o}"]
    return tree


def observe(root: Path, *, check_store: bool = True) -> Observation:
    obs = Observation()
    usr = root / "usr"
    if usr.is_symlink():
        obs.usr_is_symlink = os.readlink(usr)
    obs.usr = walk(usr.resolve() if usr.is_symlink() else usr)
    marker = obs.usr.pop(".stateID", None)
    if marker is not None:
        obs.state_id = (usr / ".stateID").read_text().strip()
    moss = root / ".moss"
    db = moss / "db" / "state"
    if db.exists():
        try:
            # closing(): a connection is a reference cycle (its statement cache), so it would stay open until
            # the garbage collector runs — and keep the file system busy for an unmount
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                obs.db_states = [row[0] for row in conn.execute("SELECT id FROM state ORDER BY id")]
        except sqlite3.Error:
            obs.db_states = []
    states_dir = moss / "root"
    if states_dir.is_dir():
        for entry in sorted(states_dir.iterdir()):
            if entry.name == "staging":
                obs.staging = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else [entry.name]
            elif entry.name.isdigit() and (entry / "usr").exists():
                obs.archived.append(entry.name)
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if entry.name in ("usr", ".moss"):
            continue
        if entry.is_symlink():
            obs.outside[entry.name] = ["symlink", os.readlink(entry)]
        elif entry.is_dir():
            for rel, value in walk(entry).items():
                obs.outside[f"{entry.name}/{rel}"] = value
            obs.outside.setdefault(entry.name + "/", ["dir"])
        else:
            obs.outside[entry.name] = ["file", hash_file(entry)]
    _read_layouts(obs, moss / "db", usr.resolve() if usr.is_symlink() else usr)
    if check_store:
        assets = moss / "assets" / "v2"
        for rel, value in walk(assets).items():
            name = rel.rsplit("/", 1)[-1]
            if name.endswith(".part"):
                obs.partial_assets.append(rel)
                continue
            obs.assets += 1
            digest = name.split(".", 1)[0]  # a mode/owner variant, <asset>.<mode>.<uid>.<gid>, holds its content
            if value[0] != "file" or value[1].lstrip("0") != digest.lstrip("0"):
                obs.bad_assets.append(rel)
    return obs


def _read_layouts(obs: Observation, db: Path, usr: Path) -> None:
    """The active state's tree as its database rows record it (upstream's schema, read directly), the assets
    every state references that the store lacks, and empty files sharing an inode."""
    try:
        # closing(): a connection's own `with` commits but never closes, and an open database keeps the
        # crash engine's mount busy (umount: EBUSY)
        with closing(sqlite3.connect(f"file:{db / 'state'}?mode=ro", uri=True)) as states, \
                closing(sqlite3.connect(f"file:{db / 'layout'}?mode=ro", uri=True)) as layout:
            selections = states.execute("SELECT state_id, package_id FROM state_selections").fetchall()
            rows = layout.execute("SELECT package_id, entry_type, entry_value1, entry_value2, mode, uid, gid "
                                  "FROM layout").fetchall()
    except sqlite3.Error:
        return
    by_package: dict[str, list] = {}
    for package, kind, value1, value2, mode, uid, gid in rows:
        by_package.setdefault(package, []).append((kind, value1, value2, mode, f"{uid}:{gid}"))
    referenced = set()
    for _state, package in selections:
        referenced |= {int(v1) for kind, v1, *_rest in by_package.get(package, ()) if kind == "regular"}
    store = db.parent / "assets" / "v2"
    for digest in sorted(referenced):
        name = f"{digest:x}"
        where = store / name[0:2] / name[2:4] / name[4:6] / name if len(name) >= 10 else store / name
        if digest != EMPTY_DIGEST and not where.is_file():
            obs.missing_assets.append(name)
    if obs.state_id and obs.state_id.isdigit():
        active = int(obs.state_id)
        tree: dict[str, list] = {}
        for state, package in selections:
            for kind, value1, value2, mode, owner in by_package.get(package, ()) if state == active else ():
                if kind == "regular":  # installed read-only: mode & ~0o222 (upstream's blit)
                    tree[value2] = ["file", f"{int(value1):032x}", f"{(mode or 0o644) & 0o7555:04o}", owner]
                elif kind == "symlink":
                    tree[value2] = ["symlink", value1]
        obs.recorded_usr = tree
    for rel, value in obs.usr.items():
        if value[0] == "file" and int(value[1], 16) == EMPTY_DIGEST:
            if os.lstat(usr / rel).st_nlink > 1:
                obs.shared_empty_files.append(rel)


# reading the root failed because its filesystem is damaged: EUCLEAN is what ext2/ext4 return for a corrupt
# structure (EFSCORRUPTED), EIO what a driver returns for what it cannot read
DAMAGE_ERRNOS = (errno.EUCLEAN, errno.EIO)
DAMAGED = "STONELAB-ROOT-DAMAGED"
DAMAGED_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.probe", description="observe a system root as JSON")
    parser.add_argument("root", type=Path)
    parser.add_argument("--disk", type=Path, help="the GPT disk holding the ESP, to observe boot entries")
    args = parser.parse_args(argv)
    try:
        obs = observe(args.root)
    except OSError as err:
        if err.errno not in DAMAGE_ERRNOS:
            raise
        # the filesystem itself is inconsistent (e.g. ext2 without a journal after a power cut): a finding about
        # the system under test, not a failure of the lab
        print(f"{DAMAGED} {err.filename}: {err.strerror} (errno {errno.errorcode[err.errno]})", file=sys.stderr)
        return DAMAGED_EXIT
    if args.disk is not None:
        obs.boot = observe_boot(args.disk)
    print(json.dumps(asdict(obs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
