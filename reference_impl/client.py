"""The reference package manager's verbs over one installation (moss's `client`): install, remove, sync,
state activate/prune/remove, under the installation lock and after recovery."""
from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from reference_impl import mutants
from reference_impl.blit import BlitReport, BlitStrategy
from reference_impl.db import Databases, Selection, State
from reference_impl.installation import Installation
from reference_impl.recovery import recover
from reference_impl.resolve import Candidate, removal, resolve
from reference_impl.stone import LayoutEntry, LayoutType, StoneError, read_stone
from reference_impl.stone.repository import check_indexed_file, file_identity, indexed_path
from reference_impl.store import Store
from reference_impl.swap import SwapChoice, SwapStrategy, choose_strategy
from reference_impl.transaction import BootConfig, Mode, Settings, Transaction, remove_tree
from stonelab.errors import StonelabError


@dataclass(frozen=True)
class ClientOptions:
    root: Path
    mode: Mode = Mode.REFERENCE
    swap: SwapStrategy = SwapStrategy.AUTO
    blit: BlitStrategy = BlitStrategy.AUTO
    triggers: bool = True
    esp: str | None = None
    root_device: str | None = None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Outcome:
    state: State | None
    packages: list[str]
    blit: BlitReport | None = None
    swap: SwapChoice | None = None
    notes: list[str] = field(default_factory=list)


class Client:
    def __init__(self, options: ClientOptions, *, log: TextIO = sys.stderr):
        self.options = options
        self.inst = Installation(options.root.resolve())
        self.log = log
        self.boot = (BootConfig(options.esp, options.root_device, options.mode is Mode.MOSS_COMPAT)
                     if options.esp else None)
        self._lock_fd: int | None = None
        self.swap: SwapChoice | None = None

    # -- set-up ------------------------------------------------------------------------------------------------
    @contextmanager
    def session(self, *, writes: bool = True) -> Iterator[Client]:
        """Lock the installation, open the databases, and (reference mode) recover from an interrupted run."""
        if not self.inst.root.is_dir():
            raise StonelabError(f"{self.inst.root}: target root does not exist")
        self.inst.ensure_dirs()
        fd = os.open(self.inst.lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"stonelab: waiting for the lock on {self.inst.lockfile} held by another process",
                      file=self.log)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.dbs = Databases.open(self.inst.db_dir)
            self.store = Store(self.inst.assets, fsync=self.durable)
            if self.durable:
                recover(self.transaction(self._strategy_for_recovery()))  # reports what it did on the log
            yield self
        finally:
            os.close(fd)

    @property
    def durable(self) -> bool:
        return self.options.mode is Mode.REFERENCE

    def _strategy_for_recovery(self) -> SwapStrategy:
        return SwapStrategy.SYMLINK if self.inst.usr.is_symlink() else SwapStrategy.EXCHANGE

    def transaction(self, strategy: SwapStrategy) -> Transaction:
        settings = Settings(self.options.mode, strategy, self.options.blit, self.options.environ)
        return Transaction(self.inst, self.dbs, settings, self.boot, self.log)

    def _swap_transaction(self) -> Transaction:
        requested = self.options.swap
        if self.options.mode is Mode.MOSS_COMPAT:
            if requested is SwapStrategy.SYMLINK:
                raise StonelabError("--mode moss-compat: upstream moss only swaps with renameat2(RENAME_EXCHANGE)")
            self.swap = SwapChoice(SwapStrategy.EXCHANGE, "moss-compat: upstream always exchanges")
        else:
            self.swap = choose_strategy(self.inst, requested)
        return self.transaction(self.swap.strategy)

    # -- what is installed -------------------------------------------------------------------------------------
    def active_state(self) -> int | None:
        return self.transaction(self._strategy_for_recovery()).active_state()

    def installed(self) -> list[Candidate]:
        active = self.active_state()
        if active is None:
            return []
        result = []
        for selection in self.dbs.state.selections(active):
            meta = self.dbs.install.get(selection.package_id)
            if meta is not None:
                result.append(Candidate(meta, meta.uri or selection.package_id, selection.package_id))
        return result

    # -- verbs -------------------------------------------------------------------------------------------------
    def install(self, files: Iterable[Path], names: Iterable[str] = (), repo: Path | None = None) -> Outcome:
        requested = [local_candidate(Path(f)) for f in files]
        available = repository_candidates(repo) if repo else []
        for name in names:
            matches = [c for c in available if c.meta.name == name]
            if not matches:
                where = f"the repository {repo}" if repo else "no repository (give --repo DIR)"
                raise StonelabError(f"{name}: no such package in {where}")
            requested.append(max(matches, key=lambda c: (c.meta.release, c.meta.build_release)))
        selected = resolve(requested, requested + available, self.installed())
        explicit = {c.package_id for c in requested}
        explicit |= {c.package_id for c in self.installed() if self._was_explicit(c.package_id)}
        summary = "install " + " ".join(sorted(c.meta.name for c in requested))
        return self._new_state(selected, explicit, summary)

    def remove(self, names: Iterable[str]) -> Outcome:
        names = list(names)
        remaining = removal(names, self.installed())
        explicit = {c.package_id for c in remaining if self._was_explicit(c.package_id)}
        return self._new_state(remaining, explicit, "remove " + " ".join(sorted(names)))

    def sync(self, repo: Path) -> Outcome:
        available = repository_candidates(repo)
        installed = self.installed()
        upgrades = []
        for current in installed:
            newer = [c for c in available if c.meta.name == current.meta.name and
                     (c.meta.release, c.meta.build_release) > (current.meta.release, current.meta.build_release)]
            if newer:
                upgrades.append(max(newer, key=lambda c: (c.meta.release, c.meta.build_release)))
        if not upgrades:
            return Outcome(None, [c.package_id for c in installed], notes=["everything is up to date"])
        selected = resolve(upgrades, available, installed)
        explicit = {c.package_id for c in selected
                    if self._was_explicit(c.package_id) or any(u.package_id == c.package_id for u in upgrades)}
        return self._new_state(selected, explicit, "sync " + " ".join(sorted(u.meta.name for u in upgrades)))

    def activate(self, state_id: int) -> Outcome:
        if self.dbs.state.get(state_id) is None:
            raise StonelabError(f"state {state_id} does not exist")
        tx = self._swap_transaction()
        tx.activate(state_id)
        return Outcome(self.dbs.state.get(state_id), [], swap=self.swap)

    def _was_explicit(self, package_id: str) -> bool:
        active = self.active_state()
        return active is not None and any(s.package_id == package_id and s.explicit
                                          for s in self.dbs.state.selections(active))

    def _new_state(self, selected: list[Candidate], explicit: set[str], summary: str) -> Outcome:
        pending = [c for c in selected if not self._has_package(c)]
        checked = {}
        for candidate in pending:   # every file is checked before anything changes
            if candidate.from_repository:
                checked[candidate.origin] = check_indexed_file(Path(candidate.origin), candidate.meta.hash,
                                                               candidate.meta.size)
        tx = self._swap_transaction()
        for candidate in pending:
            self._intake(candidate)
            if candidate.origin in checked and _identity(Path(candidate.origin)) != checked[candidate.origin]:
                raise StonelabError(f"{candidate.origin}: changed while it was being installed (a download still "
                                    f"running?): its checked sha256 no longer vouches for it; nothing committed")
        package_ids = [c.package_id for c in selected]
        entries = merged_layout(self.dbs, package_ids)
        selections = [Selection(pid, pid in explicit) for pid in package_ids]
        state, report = tx.commit(entries, selections, summary=summary, run_triggers=self._triggers(tx))
        return Outcome(state, package_ids, report, self.swap)

    def _has_package(self, candidate: Candidate) -> bool:
        """Meta, layout and every asset of the package are already recorded (its file need not be read)."""
        return (self.dbs.install.has(candidate.package_id) and self.dbs.layout.has(candidate.package_id)
                and all(self.store.has(e.digest) for _, e in self.dbs.layout.entries([candidate.package_id])
                        if e.file_type is LayoutType.REGULAR and e.digest is not None))

    def _intake(self, candidate: Candidate) -> None:
        """Unpack a package into the store and record its meta and layout."""
        stone = read_package(Path(candidate.origin))
        self.store.add(stone)
        meta = stone.meta
        meta.uri = candidate.meta.uri or str(Path(candidate.origin).resolve())
        meta.hash, meta.size = candidate.meta.hash, candidate.meta.size
        self.dbs.layout.add(candidate.package_id, stone.layout)
        self.dbs.install.add(candidate.package_id, meta)

    def _triggers(self, tx: Transaction):
        if not self.options.triggers:
            return None

        def run(staging_usr: Path) -> None:
            if not (staging_usr / "share/moss/triggers/tx.d").is_dir():
                return
            from reference_impl.triggers import TriggerError, run_transaction_triggers
            try:
                run_transaction_triggers(self.inst.root, staging_usr)
            except TriggerError as err:
                if self.durable:
                    raise
                tx.say(f"warning: {err} (moss-compat: upstream only logs failing triggers)")
        return run

    # -- states ------------------------------------------------------------------------------------------------
    def remove_states(self, state_ids: Iterable[int]) -> list[int]:
        """Drop states: rows first (durable), then their trees, then packages and assets nothing refers to."""
        ids = sorted(set(state_ids))
        active = self.active_state()
        known = {s.id for s in self.dbs.state.all()}
        for state_id in ids:
            if state_id == active:
                raise StonelabError(f"state {state_id} is active; activate another state before removing it")
            if state_id not in known:
                raise StonelabError(f"state {state_id} does not exist")
        self.dbs.state.remove(ids)
        for state_id in ids:
            remove_tree(self.inst.trees / str(state_id))
        self.collect_garbage()
        return ids

    def prune(self, keep: int) -> list[int]:
        if keep < 1:
            raise StonelabError(f"--keep {keep}: must keep at least one state")
        active = self.active_state()
        states = [s.id for s in self.dbs.state.all() if s.id != active or mutants.active("prune-active")]
        kept = set(sorted(states)[-(keep - 1):] if keep > 1 else [])
        removed = self.remove_states([s for s in states if s not in kept]) if len(states) >= keep else []
        # entries naming a pruned state drop the machine into emergency mode (upstream #585); moss-compat keeps
        # upstream's behaviour
        if removed and self.boot is not None and active is not None and self.options.mode is Mode.REFERENCE \
                and not mutants.active("stale-boot-entries"):
            self.boot(self.inst, active)
        return removed

    def collect_garbage(self) -> None:
        referenced_packages = {sel.package_id for s in self.dbs.state.all() for sel in self.dbs.state.selections(s.id)}
        orphans = [p for p in set(self.dbs.install.package_ids()) | set(self.dbs.layout.package_ids())
                   if p not in referenced_packages]
        self.dbs.layout.remove(orphans)
        self.dbs.install.remove(orphans)
        digests = {e.digest for _, e in self.dbs.layout.entries(self.dbs.layout.package_ids())
                   if e.digest is not None}
        self.store.remove_unreferenced(digests)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return file_identity(path)
    except OSError:
        return None


def read_package(path: Path):
    try:
        return read_stone(path)
    except StoneError as err:
        raise StonelabError(str(err)) from None
    except FileNotFoundError:
        raise StonelabError(f"{path}: no such package file") from None


def local_candidate(path: Path) -> Candidate:
    stone = read_package(path)
    if stone.file_type.label != "binary":
        raise StonelabError(f"{path}: a {stone.file_type.label} file, not a binary package")
    stone.check_content_checksum()  # its content may already be in the store and never read: refuse it anyway
    meta = stone.meta
    return Candidate(meta, str(path.resolve()), meta.package_id)


def repository_candidates(repo: Path) -> list[Candidate]:
    index = repo / "stone.index" if repo.is_dir() else repo
    stone = read_package(index)
    if stone.file_type.label != "repository":
        raise StonelabError(f"{index}: not a repository index")
    result: dict[str, Candidate] = {}
    builds: dict[tuple[str, int, int], Candidate] = {}
    for meta in stone.metas:
        path, meta.hash = indexed_path(index, meta.name, meta.uri, meta.hash)
        candidate = Candidate(meta, str(path), meta.hash, from_repository=True)
        build = (meta.name, meta.release, meta.build_release)
        same = builds.setdefault(build, candidate)
        if same.package_id != candidate.package_id:
            raise StonelabError(f"{index}: {meta.name} release {meta.release} build {meta.build_release} is "
                                f"listed twice with different files ({same.meta.uri} sha256 {same.package_id}, "
                                f"{meta.uri} sha256 {meta.hash}): which one is meant is unknown")
        result.setdefault(candidate.package_id, candidate)
    return list(result.values())


def inside_usr(target: str) -> bool:
    parts = target.split("/")
    return bool(target) and not target.startswith("/") and "\0" not in target and ".." not in parts


def merged_layout(dbs: Databases, package_ids: list[str], *, skip_outside: bool = False) -> list[LayoutEntry]:
    """One entry per path over the selected packages; two packages shipping different files there conflict.

    A path outside /usr (only possible in a database written by something else) is refused, or skipped for
    `state verify`, which reports it."""
    chosen: dict[str, tuple[str, LayoutEntry]] = {}
    for package_id, entry in dbs.layout.entries(sorted(package_ids)):
        if not inside_usr(entry.target):
            if skip_outside:
                continue
            raise StonelabError(f"{dbs.layout.path}: package {package_id} owns {entry.target!r}, outside /usr")
        previous = chosen.get(entry.target)
        if previous is None:
            chosen[entry.target] = (package_id, entry)
            continue
        other_id, other = previous
        if other.file_type is LayoutType.DIRECTORY and entry.file_type is LayoutType.DIRECTORY:
            continue
        if (other.file_type, other.digest, other.source) != (entry.file_type, entry.digest, entry.source):
            raise StonelabError(f"/usr/{entry.target}: file conflict between {other_id} and {package_id}")
    return [entry for _, entry in chosen.values()]
