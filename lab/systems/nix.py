"""Nix 2.8 (Debian ``nix-bin``) as a system under test: a store rooted on the SUT disk, a ``system`` profile.

Layout on the root (a Nix *chroot store*, ``--store ROOT``): ``ROOT/nix/store/<hash>-lab-system`` (one store path
per generation holding the union tree of its packages, the way a NixOS system closure is one path),
``ROOT/nix/var/nix/db/{db.sqlite,schema}`` and ``ROOT/nix/var/nix/profiles/system -> system-N-link ->
/nix/store/…`` (NixOS's generation mechanism: a symlink replaced by ``rename(2)``).

Store paths are built offline on the lab's side: ``nix-store --store SOURCE --add TREE`` into a private source
store in the work directory (the host's own ``/nix`` is never touched), published to a local binary cache
(``nix copy --to file://WORKDIR/cache``, which a guest can read from a read-only share); the operation proper is
what a NixOS upgrade does on the target: ``nix copy --from file://…/cache --to ROOT`` (NAR unpacked into the
store, then registered in the database) and ``nix-env --store ROOT -p PROFILE --set PATH``. Nix runs single-user
as root, with no daemon, no sandbox and no substituters (facts: ``../shared/docs/real-systems.md``; NixOS/nix manual, "nix-env", "nix copy", "nix store verify").
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from lab.faults import corrupt_largest_file
from lab.invariants import Violation
from lab.packages import PackageDecl
from lab.probe import walk
from lab.systems.base import (CommandRunner, Generation, Operation, RootedSystem, SetupError, SystemState, run_local,
                              run_sequence, write_tree)
from lab.target import CommandResult

# single-user, offline, no build users; NIX_CONF_DIR points at an empty directory so /etc/nix is not read
NIX_SETTINGS = ("experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n"
                "require-sigs = false\n")
SCHEMA_VERSION = "10"  # nix 2.8's local store schema (src/libstore/local-store.cc: nixSchemaVersion)
PROFILE = "nix/var/nix/profiles/system"
_LINK = re.compile(r"^system-(\d+)-link$")

INVARIANTS = ("nix_store_verified", "nix_db_valid", "nix_profile_complete")
# what each invariant checked when it held (the report's evidence)
EVIDENCE = {"nix_store_verified": "nix store verify --all --no-trust: every registered path hashes to its NAR hash",
            "nix_db_valid": f"db/schema holds {SCHEMA_VERSION}; nix path-info --all reads the database; SQLite "
                            "quick_check ok",
            "nix_profile_complete": "profiles/system names a generation link; every generation names a registered "
                                    "store path present in the store"}


class NixSystem(RootedSystem):
    """Nix on ``root``; ``workdir`` (lab side) holds the source store, the binary cache and the trees;
    ``scratch`` (writable where the commands run; default ``workdir/home``) is Nix's HOME and caches."""

    name = "nix"
    operations = frozenset(Operation)
    invariant_names = INVARIANTS
    evidence = EVIDENCE

    def __init__(self, root: Path, workdir: Path, run: CommandRunner = run_local, *, scratch: Path | None = None):
        super().__init__(root, workdir, run)
        self.source = workdir / "source-store"
        self.cache = f"file://{workdir / 'cache'}"
        self.profile = root / PROFILE
        home = scratch or workdir / "home"
        self.home = home
        self.env = {"NIX_CONFIG": NIX_SETTINGS, "NIX_CONF_DIR": str(home / "nix-conf"), "HOME": str(home),
                    "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
                    "XDG_DATA_HOME": str(home / ".local/share"), "NIX_REMOTE": ""}

    # --- set-up on the lab's side ---------------------------------------------------------------------------
    def prepare(self) -> None:
        for path in (self.root, self.home / "nix-conf"):
            path.mkdir(parents=True, exist_ok=True)

    def stage(self, result: Sequence[PackageDecl]) -> str:
        """Build the generation holding ``result`` in the source store and publish it to the binary cache, on
        this machine (whatever runs the operations); returns its store path."""
        tree = write_tree(self.new_tree_dir() / "lab-system", result)
        env = dict(self.env, HOME=str(self.workdir / "stage-home"), XDG_CACHE_HOME=str(self.workdir / "stage-home"))
        added = run_local(["nix-store", "--store", str(self.source), "--add", str(tree)], env=env)
        if not added.ok:
            raise SetupError(f"nix-store --add {tree}: {added.summary()}")
        path = added.stdout.strip().splitlines()[-1]
        published = run_local(["nix", "copy", "--from", str(self.source), "--to", self.cache, path], env=env)
        if not published.ok:
            raise SetupError(f"nix copy --to {self.cache}: {published.summary()}")
        return path

    # --- operations -----------------------------------------------------------------------------------------
    def install(self, added: Sequence[PackageDecl], result: Sequence[PackageDecl]) -> CommandResult:
        return self.set_generation(self.stage(result))

    def remove(self, names: Sequence[str], result: Sequence[PackageDecl]) -> CommandResult:
        return self.set_generation(self.stage(result))

    def set_generation(self, path: str) -> CommandResult:
        """The upgrade proper: copy the closure into the SUT store, then a new profile generation naming it."""
        return run_sequence(self.run, [
            ["nix", "copy", "--no-check-sigs", "--from", self.cache, "--to", str(self.root), path],
            ["nix-env", "--store", str(self.root), "-p", str(self.profile), "--set", path],
        ], env=self.env)

    def switch(self, number: int) -> CommandResult:
        return self._nix("nix-env", "--store", str(self.root), "-p", str(self.profile), "--switch-generation",
                         str(number))

    def rollback(self, state: SystemState | None = None) -> CommandResult:
        return self._nix("nix-env", "--store", str(self.root), "-p", str(self.profile), "--rollback")

    def gc(self, keep: int, state: SystemState | None = None) -> CommandResult:
        state = state or self.state()
        numbers = sorted(g.number for g in state.generations)
        doomed = [n for n in numbers[:max(len(numbers) - keep, 0)] if n != state.current]
        steps = []
        if doomed:
            steps.append(["nix-env", "--store", str(self.root), "-p", str(self.profile), "--delete-generations",
                          *map(str, doomed)])
        steps.append(["nix-store", "--store", str(self.root), "--gc"])
        return run_sequence(self.run, steps, env=self.env)

    def verify(self) -> CommandResult:
        return self._nix("nix", "store", "verify", "--all", "--no-trust", "--store", str(self.root))

    def corrupt_store(self) -> str:
        """Flip the first byte of the largest file of the current generation's store path (after
        registration: what NixOS/nix#1218 reports); returns its path relative to the root."""
        current = self.state().current_generation()
        if current is None:
            raise SetupError(f"{self.root}: no generation to corrupt")
        return corrupt_largest_file(self.in_root(current.ref), self.root)

    def cleanup(self) -> None:
        """Nothing: a chroot store is ordinary files."""

    # --- reading the state ----------------------------------------------------------------------------------
    def state(self) -> SystemState:
        state = SystemState()
        profiles = self.profile.parent
        if profiles.is_dir():
            for entry in sorted(profiles.iterdir()):
                match = _LINK.match(entry.name)
                if match and entry.is_symlink():
                    state.generations.append(Generation(int(match[1]), os.readlink(entry)))
        state.generations.sort(key=lambda g: g.number)
        if self.profile.is_symlink():
            match = _LINK.match(os.readlink(self.profile))
            if match:
                state.current = int(match[1])
            else:
                state.problems.append(f"/{PROFILE} -> {os.readlink(self.profile)}, not a generation link")
        current = state.current_generation()
        if current is not None:
            path = self.in_root(current.ref)
            if path.is_dir():
                state.tree = walk(path)
            else:
                state.problems.append(f"generation {current.number} names {current.ref}, which is not a "
                                      "directory in the store")
        return state

    def in_root(self, store_path: str) -> Path:
        """A logical store path (``/nix/store/…``) as a path below the root."""
        return self.root / store_path.lstrip("/")

    def valid_paths(self) -> tuple[list[str] | None, str]:
        """The store paths the database registers as valid (Nix opens it, so WAL recovery is its own), or
        None and why Nix could not read the database."""
        listed = self._nix("nix", "path-info", "--all", "--json", "--store", str(self.root))
        if not listed.ok:
            return None, listed.summary()
        return [entry["path"] for entry in json.loads(listed.stdout or "[]")], ""

    # --- invariants -----------------------------------------------------------------------------------------
    def invariants(self, state: SystemState) -> list[Violation]:
        db = self.root / "nix/var/nix/db"
        if not (db / "db.sqlite").exists() and not state.generations:
            return []  # nothing installed yet: no store to judge
        violations: list[Violation] = []
        valid, why = self.valid_paths()
        violations += [Violation("nix_db_valid", p) for p in self._db_problems(db, why)]
        verified = self.verify()
        if not verified.ok:
            violations.append(Violation("nix_store_verified", _store_verify_problem(verified)))
        violations += [Violation("nix_profile_complete", p) for p in self._profile_problems(state, valid)]
        return violations

    def _db_problems(self, db: Path, nix_error: str) -> list[str]:
        problems = []
        schema = db / "schema"
        if not schema.is_file():
            problems.append("nix/var/nix/db/schema is missing")
        elif schema.read_text(errors="replace").strip() != SCHEMA_VERSION:
            content = schema.read_bytes()[:20]
            problems.append(f"nix/var/nix/db/schema holds {content!r}, not {SCHEMA_VERSION!r} "
                            "(NixOS/nix#7064: every command then fails with 'schema is corrupt')")
        if nix_error:
            problems.append(f"nix cannot read its database: {nix_error}")
        elif (db / "db.sqlite").exists():
            try:
                with closing(sqlite3.connect(f"file:{db / 'db.sqlite'}?mode=ro", uri=True)) as conn:
                    verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    problems.append(f"db.sqlite quick_check: {verdict}")
            except sqlite3.Error as err:
                problems.append(f"db.sqlite cannot be opened: {err}")
        return problems

    def _profile_problems(self, state: SystemState, valid: list[str] | None) -> list[str]:
        problems = list(state.problems)
        if self.profile.is_symlink() and state.current_generation() is None and state.current is not None:
            problems.append(f"/{PROFILE} names generation {state.current}, whose link is missing")
        for generation in state.generations:
            if not self.in_root(generation.ref).exists():
                problems.append(f"generation {generation.number} names {generation.ref}, absent from the store")
            elif valid is not None and generation.ref not in valid:
                problems.append(f"generation {generation.number} names {generation.ref}, which the database "
                                "does not register as valid")
        return problems

    def _nix(self, *argv: str) -> CommandResult:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.run(list(argv), env=self.env)


def _store_verify_problem(result: CommandResult) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines()
             if line.strip() and "checking" not in line and not line.startswith("warning:")]
    return "nix store verify --all --no-trust: " + ("; ".join(lines[:3]) or result.summary())
