"""The three SQLite databases of an installation, with upstream moss's schemas: state, install (meta), layout.

SQLite's default rollback journal with ``synchronous=FULL`` makes every commit durable (upstream runs with the
same defaults); the reference relies on that ordering: a state row is committed before the intent record.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from reference_impl.stone import Dependency, LayoutEntry, LayoutType, Meta
from stonelab.errors import StonelabError

STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    created BIGINT NOT NULL DEFAULT (unixepoch()),
    summary TEXT NULL,
    description TEXT NULL
);
CREATE TABLE IF NOT EXISTS state_selections (
    state_id INTEGER NOT NULL,
    package_id TEXT NOT NULL,
    explicit BOOLEAN NOT NULL,
    reason TEXT NULL,
    PRIMARY KEY(state_id, package_id),
    FOREIGN KEY(state_id) REFERENCES state(id) ON DELETE CASCADE
);
"""

INSTALL_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    package TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    version_identifier TEXT NOT NULL,
    source_release INT NOT NULL,
    build_release INT NOT NULL,
    architecture TEXT NOT NULL,
    summary TEXT NOT NULL,
    description TEXT NOT NULL,
    source_id TEXT NOT NULL,
    homepage TEXT NOT NULL,
    uri TEXT NULL,
    hash TEXT NULL,
    download_size BIGINT NULL
);
""" + "".join(f"""
CREATE TABLE IF NOT EXISTS {table} (
    package TEXT NOT NULL,
    {column} TEXT NOT NULL,
    PRIMARY KEY (package, {column}),
    FOREIGN KEY (package) REFERENCES meta(package) ON DELETE CASCADE
);
""" for table, column in (("meta_licenses", "license"), ("meta_dependencies", "dependency"),
                          ("meta_providers", "provider"), ("meta_conflicts", "conflict")))

LAYOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS layout (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    package_id TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    tag INTEGER NOT NULL,
    entry_type TEXT NOT NULL,
    entry_value1 TEXT NULL,
    entry_value2 TEXT NULL
);
CREATE INDEX IF NOT EXISTS layout_package ON layout(package_id);
"""

_ENTRY_TYPES = {t.label: t for t in LayoutType}


@dataclass(frozen=True)
class State:
    id: int
    type: str
    created: int
    summary: str | None
    description: str | None


@dataclass(frozen=True)
class Selection:
    package_id: str
    explicit: bool
    reason: str | None = None


class Database:
    """One SQLite file; connections are opened per operation and closed at once (no long-lived global state)."""

    schema = ""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(sqlite3.connect(path, isolation_level=None)) as conn:
                conn.executescript(self.schema)
        except sqlite3.Error as err:
            raise StonelabError(f"{path}: cannot open database: {err}") from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as err:
            raise StonelabError(f"{self.path}: cannot open database: {err}") from None
        with closing(conn):
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StonelabError(f"{self.path}: database error: {err}") from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


class StateDB(Database):
    schema = STATE_SCHEMA

    def add(self, selections: Iterable[Selection], *, type: str = "transaction", summary: str | None = None,
            description: str | None = None) -> State:
        with self.transaction() as conn:
            cur = conn.execute("INSERT INTO state (type, created, summary, description) VALUES (?, ?, ?, ?)",
                               (type, int(time.time()), summary, description))
            state_id = int(cur.lastrowid)
            conn.executemany(
                "INSERT INTO state_selections (state_id, package_id, explicit, reason) VALUES (?, ?, ?, ?)",
                [(state_id, s.package_id, s.explicit, s.reason) for s in selections])
            return self._get(conn, state_id)

    def get(self, state_id: int) -> State | None:
        with self.transaction() as conn:
            return self._get(conn, state_id)

    @staticmethod
    def _get(conn: sqlite3.Connection, state_id: int) -> State | None:
        row = conn.execute("SELECT id, type, created, summary, description FROM state WHERE id = ?",
                           (state_id,)).fetchone()
        return State(*row) if row else None

    def all(self) -> list[State]:
        with self.transaction() as conn:
            return [State(*row) for row in
                    conn.execute("SELECT id, type, created, summary, description FROM state ORDER BY id")]

    def selections(self, state_id: int) -> list[Selection]:
        with self.transaction() as conn:
            return [Selection(p, bool(e), r) for p, e, r in conn.execute(
                "SELECT package_id, explicit, reason FROM state_selections WHERE state_id = ? ORDER BY package_id",
                (state_id,))]

    def remove(self, state_ids: Iterable[int]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM state WHERE id = ?", [(i,) for i in state_ids])


class InstallDB(Database):
    schema = INSTALL_SCHEMA

    def add(self, package_id: str, meta: Meta) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM meta WHERE package = ?", (package_id,))
            conn.execute("INSERT INTO meta VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                package_id, meta.name, meta.version, meta.release, meta.build_release, meta.architecture,
                meta.summary, meta.description, meta.source_id, meta.homepage, meta.uri, meta.hash, meta.size))
            for table, column, values in (("meta_licenses", "license", meta.licenses),
                                          ("meta_dependencies", "dependency", map(str, meta.depends)),
                                          ("meta_providers", "provider", map(str, meta.provides)),
                                          ("meta_conflicts", "conflict", map(str, meta.conflicts))):
                conn.executemany(f"INSERT OR IGNORE INTO {table} (package, {column}) VALUES (?, ?)",
                                 [(package_id, v) for v in values])

    def has(self, package_id: str) -> bool:
        with self.transaction() as conn:
            return conn.execute("SELECT 1 FROM meta WHERE package = ?", (package_id,)).fetchone() is not None

    def get(self, package_id: str) -> Meta | None:
        with self.transaction() as conn:
            row = conn.execute("SELECT name, version_identifier, source_release, build_release, architecture, "
                               "summary, description, source_id, homepage, uri, hash, download_size "
                               "FROM meta WHERE package = ?", (package_id,)).fetchone()
            if row is None:
                return None

            def values(table: str, column: str) -> list[str]:
                return [v for (v,) in conn.execute(
                    f"SELECT {column} FROM {table} WHERE package = ? ORDER BY rowid", (package_id,))]
            return Meta(name=row[0], version=row[1], release=row[2], build_release=row[3], architecture=row[4],
                        summary=row[5], description=row[6], source_id=row[7], homepage=row[8], uri=row[9],
                        hash=row[10], size=row[11], licenses=values("meta_licenses", "license"),
                        depends=[Dependency.parse(v) for v in values("meta_dependencies", "dependency")],
                        provides=[Dependency.parse(v) for v in values("meta_providers", "provider")],
                        conflicts=[Dependency.parse(v) for v in values("meta_conflicts", "conflict")])

    def package_ids(self) -> list[str]:
        with self.transaction() as conn:
            return [p for (p,) in conn.execute("SELECT package FROM meta ORDER BY package")]

    def remove(self, package_ids: Iterable[str]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM meta WHERE package = ?", [(p,) for p in package_ids])


class LayoutDB(Database):
    schema = LAYOUT_SCHEMA

    def add(self, package_id: str, entries: Iterable[LayoutEntry]) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM layout WHERE package_id = ?", (package_id,))
            conn.executemany(
                "INSERT INTO layout (package_id, uid, gid, mode, tag, entry_type, entry_value1, entry_value2) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(package_id, e.uid, e.gid, e.mode, e.tag, e.file_type.label, *_values(e)) for e in entries])

    def has(self, package_id: str) -> bool:
        with self.transaction() as conn:
            return conn.execute("SELECT 1 FROM layout WHERE package_id = ? LIMIT 1",
                                (package_id,)).fetchone() is not None

    def entries(self, package_ids: Iterable[str]) -> Iterator[tuple[str, LayoutEntry]]:
        """(package_id, entry) for the given packages, in package then insertion order."""
        for package_id in package_ids:
            with self.transaction() as conn:
                rows = conn.execute("SELECT uid, gid, mode, tag, entry_type, entry_value1, entry_value2 "
                                    "FROM layout WHERE package_id = ? ORDER BY id", (package_id,)).fetchall()
            for uid, gid, mode, tag, entry_type, value1, value2 in rows:
                yield package_id, _entry(uid, gid, mode, tag, entry_type, value1, value2, self.path)

    def package_ids(self) -> list[str]:
        with self.transaction() as conn:
            return [p for (p,) in conn.execute("SELECT DISTINCT package_id FROM layout ORDER BY package_id")]

    def remove(self, package_ids: Iterable[str]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM layout WHERE package_id = ?", [(p,) for p in package_ids])


def _values(entry: LayoutEntry) -> tuple[str | None, str]:
    if entry.file_type is LayoutType.REGULAR:
        return str(entry.digest), entry.target
    if entry.file_type is LayoutType.SYMLINK:
        return entry.source, entry.target
    return None, entry.target


def _entry(uid: int, gid: int, mode: int, tag: int, entry_type: str, value1: str | None, value2: str | None,
           where: Path) -> LayoutEntry:
    file_type = _ENTRY_TYPES.get(entry_type)
    if file_type is None or value2 is None:
        raise StonelabError(f"{where}: corrupt layout row ({entry_type!r}, {value2!r})")
    if file_type is LayoutType.REGULAR:
        return LayoutEntry(uid, gid, mode, tag, file_type, value2, digest=int(value1 or 0))
    if file_type is LayoutType.SYMLINK:
        return LayoutEntry(uid, gid, mode, tag, file_type, value2, source=value1)
    return LayoutEntry(uid, gid, mode, tag, file_type, value2)


@dataclass
class Databases:
    state: StateDB
    install: InstallDB
    layout: LayoutDB

    @classmethod
    def open(cls, db_dir: Path) -> Databases:
        return cls(StateDB(db_dir / "state"), InstallDB(db_dir / "install"), LayoutDB(db_dir / "layout"))
