"""Observe a system root as data: the /usr tree, the state marker, staging, the store, what lies outside /usr.

Runs wherever the root is — in the lab process for the host target, as ``python -m lab.probe ROOT`` inside a
guest for the VM target — and prints JSON, so invariants are judged the same way on both.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference_impl.store import hash_file as store_hash

ROOT_LINKS = ("bin", "sbin", "lib", "lib64", "lib32")


@dataclass
class Observation:
    usr: dict[str, list] = field(default_factory=dict)  # rel path -> ["file", digest hex, mode] | ["symlink", dest]
    usr_is_symlink: str | None = None
    state_id: str | None = None
    db_states: list[int] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)  # ids under .moss/root/ with a usr tree
    staging: list[str] = field(default_factory=list)  # entries left in .moss/root/staging
    outside: dict[str, list] = field(default_factory=dict)  # everything outside /usr and /.moss
    bad_assets: list[str] = field(default_factory=list)
    partial_assets: list[str] = field(default_factory=list)
    assets: int = 0


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
                tree[rel] = ["file", hash_file(full), f"{stat.S_IMODE(st.st_mode):04o}"]
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
    if check_store:
        assets = moss / "assets" / "v2"
        for rel, value in walk(assets).items():
            name = rel.rsplit("/", 1)[-1]
            if name.endswith(".part"):
                obs.partial_assets.append(rel)
                continue
            obs.assets += 1
            if value[0] != "file" or value[1].lstrip("0") != name.lstrip("0"):
                obs.bad_assets.append(rel)
    return obs


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m lab.probe ROOT", file=sys.stderr)
        return 2
    print(json.dumps(asdict(observe(Path(args[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
