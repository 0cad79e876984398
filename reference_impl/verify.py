"""`state verify [--repair]`: re-hash the store and every state tree against the recorded layouts.

Reported: assets missing or with wrong content; per state, a missing tree, missing or wrong files, wrong symlink
targets, files under /usr that no package owns (stateless policy) and package-owned paths outside /usr.  Repair
re-extracts bad assets from the package file (upstream #392: impossible when the file is gone — reported, not
hidden) and re-blits damaged trees beside the old one, then swaps the repaired tree in.
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from reference_impl import mutants
from reference_impl.blit import BlitOptions, blit
from reference_impl.client import Client, inside_usr, merged_layout, read_package
from reference_impl.installation import STATE_ID_FILE
from reference_impl.stone import LayoutEntry, LayoutType
from reference_impl.store import hash_file
from reference_impl.swap import renameat2_exchange
from reference_impl.transaction import remove_tree

# Written by the transaction itself, not by a package.
SYSTEM_FILES = {STATE_ID_FILE, "lib/os-release"}


@dataclass
class Problem:
    kind: str  # asset | missing-tree | missing | wrong-content | wrong-type | wrong-target | unowned | outside-usr
    path: str
    detail: str
    state: int | None = None
    repaired: bool = False

    def line(self) -> str:
        where = f"state {self.state}: " if self.state is not None else ""
        return f"{where}{self.kind}: {self.path}: {self.detail}" + (" (repaired)" if self.repaired else "")

    def as_dict(self) -> dict:
        return asdict(self)


def verify(client: Client, *, repair: bool = False) -> list[Problem]:
    problems = _verify_store(client, repair)
    for state in client.dbs.state.all():
        tree = _tree_of(client, state.id)
        package_ids = [s.package_id for s in client.dbs.state.selections(state.id)]
        entries = merged_layout(client.dbs, package_ids, skip_outside=True)
        found = _outside_usr(client, package_ids, state.id) + _verify_tree(tree, entries, state.id)
        if found and repair and tree.is_dir() and not any(p.kind == "asset" and not p.repaired for p in problems):
            _reblit(client, state.id, tree, entries)
            for problem in found:
                problem.repaired = problem.kind != "outside-usr"
        problems += found
    return problems


def _tree_of(client: Client, state_id: int) -> Path:
    inst = client.inst
    if not inst.usr.is_symlink() and client.active_state() == state_id:
        return inst.usr
    return inst.archived(state_id)


def _verify_store(client: Client, repair: bool) -> list[Problem]:
    owners: dict[int, str] = {}
    for package_id, entry in client.dbs.layout.entries(client.dbs.layout.package_ids()):
        if entry.file_type is LayoutType.REGULAR and entry.digest is not None:
            owners.setdefault(entry.digest, package_id)
    problems = [Problem("asset", str(p.path), p.problem) for p in client.store.verify(owners)]
    if repair:
        for problem in problems:
            damaged = Path(problem.path)
            digest = int(damaged.name.split(".", 1)[0], 16)
            canonical = damaged.with_name(damaged.name.split(".", 1)[0])
            if damaged != canonical:
                # a mode/owner variant (or a .part leftover): drop it; the trees that linked it are re-blitted
                # below, and the blit makes the variant afresh from the canonical asset
                damaged.unlink(missing_ok=True)
                if hash_file(canonical) == digest:
                    problem.repaired = True
                    continue
            meta = client.dbs.install.get(owners[digest])
            source = Path(meta.uri) if meta and meta.uri else None
            if source is None or not source.is_file():
                problem.detail += f"; cannot repair: the package file {source} is gone (upstream #392)"
                continue
            canonical.unlink(missing_ok=True)
            client.store.add(read_package(source))
            problem.repaired = hash_file(canonical) == digest
    return problems


def _outside_usr(client: Client, package_ids: list[str], state_id: int) -> list[Problem]:
    return [Problem("outside-usr", entry.target, f"package {package_id} owns a path outside /usr", state_id)
            for package_id, entry in client.dbs.layout.entries(package_ids) if not inside_usr(entry.target)]


def _verify_tree(tree: Path, entries: list[LayoutEntry], state_id: int) -> list[Problem]:
    if not tree.is_dir():
        return [Problem("missing-tree", str(tree), "the state's tree is not on disk", state_id)]
    problems = []
    expected = {e.target: e for e in entries}
    hashed: dict[tuple[int, int], int | None] = {}
    for target, entry in expected.items():
        path = tree / target
        try:
            st = path.lstat()
        except FileNotFoundError:
            problems.append(Problem("missing", f"/usr/{target}", "missing", state_id))
            continue
        kind = entry.file_type
        if kind is LayoutType.REGULAR:
            if not stat.S_ISREG(st.st_mode):
                problems.append(Problem("wrong-type", f"/usr/{target}", "not a regular file", state_id))
                continue
            key = (st.st_dev, st.st_ino)
            if key not in hashed:
                hashed[key] = hash_file(path)
            if hashed[key] != entry.digest and not mutants.active("skip-asset-hash-check"):
                problems.append(Problem("wrong-content", f"/usr/{target}",
                                        f"hashes to {hashed[key] or 0:032x}, expected {entry.digest:032x}", state_id))
        elif kind is LayoutType.SYMLINK:
            if not stat.S_ISLNK(st.st_mode):
                problems.append(Problem("wrong-type", f"/usr/{target}", "not a symlink", state_id))
            elif os.readlink(path) != entry.source:
                problems.append(Problem("wrong-target", f"/usr/{target}",
                                        f"points to {os.readlink(path)}, expected {entry.source}", state_id))
        elif kind is LayoutType.DIRECTORY:
            if not stat.S_ISDIR(st.st_mode):
                problems.append(Problem("wrong-type", f"/usr/{target}", "not a directory", state_id))
            else:
                problems += _directory_metadata(target, st, state_id, entry)
    owned_dirs = {t.rsplit("/", i)[0] for t in [*expected, *SYSTEM_FILES] for i in range(1, t.count("/") + 1)}
    for dirpath, dirs, files in os.walk(tree):
        rel_dir = os.path.relpath(dirpath, tree)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in expected and rel not in SYSTEM_FILES:
                problems.append(Problem("unowned", f"/usr/{rel}", "no package owns this file", state_id))
        for name in dirs:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(os.path.join(dirpath, name)) or rel in expected:
                continue
            if rel not in owned_dirs:
                problems.append(Problem("unowned", f"/usr/{rel}/", "no package owns this directory", state_id))
            else:   # a parent no layout lists: the blit made it 0755 root:root
                problems += _directory_metadata(rel, os.lstat(os.path.join(dirpath, name)), state_id)
    return problems


def _directory_metadata(target: str, st: os.stat_result, state_id: int, entry: LayoutEntry | None = None,
                        ) -> list[Problem]:
    """A directory's mode (all 12 permission bits) and, when running as root (only root can give owners),
    its owner against the layout's ``entry``, or 0755 root:root for a directory no layout lists."""
    problems = []
    want, uid, gid = (stat.S_IMODE(entry.mode), entry.uid, entry.gid) if entry is not None else (0o755, 0, 0)
    have = stat.S_IMODE(st.st_mode)
    if have != want:
        problems.append(Problem("wrong-mode", f"/usr/{target}/", f"mode {have:04o}, expected {want:04o}", state_id))
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (uid, gid):
        problems.append(Problem("wrong-owner", f"/usr/{target}/",
                                f"owner {st.st_uid}:{st.st_gid}, expected {uid}:{gid}", state_id))
    return problems


def _reblit(client: Client, state_id: int, tree: Path, entries: list[LayoutEntry]) -> None:
    """Blit the state afresh beside the damaged tree, then swap it in (exchange when the fs has it)."""
    fresh_parent = client.inst.trees / f"repair-{state_id}"
    remove_tree(fresh_parent)
    fresh = fresh_parent / "usr"
    fresh.mkdir(parents=True)
    blit(entries, client.inst.assets, fresh, BlitOptions(strategy=client.options.blit, fsync=client.durable))
    for name in SYSTEM_FILES:
        source = tree / name
        if source.is_file():
            (fresh / name).parent.mkdir(parents=True, exist_ok=True)
            (fresh / name).write_bytes(source.read_bytes())
    try:
        renameat2_exchange(fresh, tree)
    except OSError:
        broken = fresh_parent / "broken"
        os.rename(tree, broken)
        os.rename(fresh, tree)
    remove_tree(fresh_parent)
