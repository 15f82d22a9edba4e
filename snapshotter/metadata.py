"""Snapshot metadata in SQLite (WAL): snapshots, their parents, labels and layer state.

The store knows records, not directories: `snapshots.py` decides what a record means on disk.
Every mutation is one transaction, taken with `MetaStore.write()`; reads take `read()` and see one
consistent state. The transaction object is passed explicitly, never hidden in a context.

Concurrency contract: one connection per thread (gRPC serves RPCs from a thread pool). Readers
never block (WAL). Writers are serialised by a process lock *and* `BEGIN IMMEDIATE`, so code that
runs inside `write()` (creating and renaming a snapshot directory, listing directories for Cleanup)
is exclusive with every other writer, as a bolt write transaction is in containerd.

The checks inside `Txn` follow containerd's snapshots/storage (bolt.go) in order and error class,
because containerd tells errors apart by class.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class Kind(enum.IntEnum):
    """Snapshot kinds; the values are those of containerd's protobuf enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What containerd sees of a snapshot (snapshots.Info)."""

    name: str
    parent: str = ""  # "" when the snapshot has no parent
    kind: Kind = Kind.UNKNOWN
    created_ns: int = 0  # Unix time in nanoseconds, UTC
    updated_ns: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    size: int = 0  # bytes allocated on disk
    inodes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A stored record: the Info plus what only the daemon needs."""

    id: int  # names the directory snapshots/<id>; never reused
    info: Info
    parent_id: int | None
    usage: Usage  # stored at Commit; zero for active and view snapshots
    remote: bool  # fs/ is served by a LayerMounter, not a plain directory


def create_schema(conn: sqlite3.Connection) -> None:
    """The whole schema, version SCHEMA_VERSION. Upgrades key on `PRAGMA user_version`.

    Runs inside the caller's transaction (so no executescript, which would commit it).
    """
    # One row per snapshot, whatever its kind.
    conn.execute(
        """
        CREATE TABLE snapshots (
            -- AUTOINCREMENT: an id is never handed out twice once committed, so a snapshot
            -- directory is never shared by two records.
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            -- containerd's key (active, view) or name (committed); one namespace for all kinds.
            name TEXT NOT NULL UNIQUE,
            -- NULL: no parent. Always a committed snapshot (checked on insert; committed
            -- snapshots never change kind). RESTRICT: a parent outlives its children.
            parent_id INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
            -- Kind: 1 view, 2 active, 3 committed.
            kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
            -- Unix nanoseconds, UTC. Commit resets both, as containerd does.
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            -- Disk usage measured at Commit; 0 while active or view (measured live).
            size INTEGER NOT NULL DEFAULT 0,
            inodes INTEGER NOT NULL DEFAULT 0,
            -- Layer state: 1 when fs/ is a mount served by the LayerMounter (lazy layer).
            remote INTEGER NOT NULL DEFAULT 0 CHECK (remote IN (0, 1))
        )
        """
    )
    conn.execute("CREATE INDEX snapshots_parent ON snapshots(parent_id)")
    # Labels; an empty value is never stored (containerd treats it as "unset").
    conn.execute(
        """
        CREATE TABLE labels (
            snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL CHECK (value != ''),
            PRIMARY KEY (snapshot_id, key)
        ) WITHOUT ROWID
        """
    )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise Unavailable(
            f"metadata schema version {version} is newer than this zest ({SCHEMA_VERSION})"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # not done meanwhile
            create_schema(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_SELECT = """
    SELECT s.id, s.name, p.name, s.kind, s.created_ns, s.updated_ns, s.parent_id,
           s.size, s.inodes, s.remote
    FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_Row = tuple[int, str, str | None, int, int, int, int | None, int, int, int]


class Txn:
    """One transaction. Methods raise the domain errors containerd expects."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    # -- reads

    def get(self, name: str) -> Snapshot | None:
        row = self._conn.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else self._snapshot(row, self._labels(row[0]))

    def require(self, name: str) -> Snapshot:
        snap = self.get(name)
        if snap is None:
            raise NotFound(f"snapshot {name} does not exist")
        return snap

    def parent_ids(self, snap: Snapshot) -> list[int]:
        """Ids of the snapshot's ancestors, its parent first and the root last."""
        if snap.parent_id is None:
            return []
        rows = self._conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
                UNION ALL
                SELECT s.id, s.parent_id, c.depth + 1
                FROM snapshots s JOIN chain c ON s.id = c.parent_id
            )
            SELECT id FROM chain ORDER BY depth
            """,
            (snap.parent_id,),
        ).fetchall()
        return [r[0] for r in rows]

    def walk(self) -> Iterator[Snapshot]:
        """Every snapshot, ordered by name (bytewise, as containerd's bolt store walks)."""
        labels: dict[int, dict[str, str]] = {}
        for sid, key, value in self._conn.execute("SELECT snapshot_id, key, value FROM labels"):
            labels.setdefault(sid, {})[key] = value
        for row in self._conn.execute(_SELECT + " ORDER BY s.name").fetchall():
            yield self._snapshot(row, labels.get(row[0], {}))

    def ids(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}

    def remote_snapshots(self) -> list[Snapshot]:
        rows = self._conn.execute(_SELECT + " WHERE s.remote = 1 ORDER BY s.id").fetchall()
        return [self._snapshot(r, self._labels(r[0])) for r in rows]

    # -- writes

    def create(
        self, kind: Kind, name: str, parent: str, labels: Mapping[str, str], now_ns: int
    ) -> Snapshot:
        """Insert an active or view snapshot (storage.CreateSnapshot)."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind.name} invalid; only active or view can be created"
            )
        parent_id = None
        if parent:
            p = self.get(parent)
            if p is None:
                raise NotFound(f"missing parent {parent!r}")
            if p.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = p.id
        if self._exists(name):
            raise AlreadyExists(f"snapshot {name} already exists")
        cur = self._conn.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, parent_id, int(kind), now_ns, now_ns),
        )
        sid = cur.lastrowid
        assert sid is not None
        self._write_labels(sid, labels)
        return self.require(name)

    def commit_active(
        self,
        key: str,
        name: str,
        usage: Usage,
        labels: Mapping[str, str],
        now_ns: int,
        *,
        remote: bool = False,
    ) -> Snapshot:
        """Turn active `key` into committed `name` (storage.CommitActive): same id, new name,
        labels replaced (not inherited), created and updated reset to now."""
        if self._exists(name):
            raise AlreadyExists(f"committed snapshot {name} already exists")
        snap = self.get(key)
        if snap is None:
            raise NotFound(f"failed to get active snapshot {key!r}")
        if snap.info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        self._conn.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ?, remote = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                now_ns,
                now_ns,
                usage.size,
                usage.inodes,
                int(remote),
                snap.id,
            ),
        )
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snap.id,))
        self._write_labels(snap.id, labels)
        return self.require(name)

    def remove(self, name: str) -> Snapshot:
        """Delete a snapshot without children (storage.Remove); returns what was deleted."""
        snap = self.get(name)
        if snap is None:
            raise NotFound(f"snapshot {name} does not exist")
        child = self._conn.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snap.id,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(f"cannot remove snapshot {name} with child")
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def set_labels(self, name: str, labels: Mapping[str, str], now_ns: int) -> Snapshot:
        """Replace all labels and bump the updated time (storage.UpdateInfo's write)."""
        snap = self.get(name)
        if snap is None:
            raise NotFound(f"snapshot {name} does not exist")
        self._conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now_ns, snap.id))
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snap.id,))
        self._write_labels(snap.id, labels)
        return self.require(name)

    # -- helpers

    def _exists(self, name: str) -> bool:
        q = "SELECT 1 FROM snapshots WHERE name = ?"
        return self._conn.execute(q, (name,)).fetchone() is not None

    def _labels(self, sid: int) -> dict[str, str]:
        q = "SELECT key, value FROM labels WHERE snapshot_id = ? ORDER BY key"
        return dict(self._conn.execute(q, (sid,)).fetchall())

    def _write_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        self._conn.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items() if v],
        )

    @staticmethod
    def _snapshot(row: _Row, labels: dict[str, str]) -> Snapshot:
        sid, name, parent, kind, created, updated, parent_id, size, inodes, remote = row
        info = Info(name, parent or "", Kind(kind), created, updated, labels)
        return Snapshot(sid, info, parent_id, Usage(size, inodes), bool(remote))


class MetaStore:
    """The database file and its per-thread connections."""

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        with self._write_lock:
            _migrate(self._connection())

    @contextmanager
    def read(self) -> Iterator[Txn]:
        conn = self._connection()
        with self._sqlite_errors():
            conn.execute("BEGIN")
        try:
            yield Txn(conn)
        finally:
            conn.execute("COMMIT")  # a read-only transaction: nothing to roll back

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """Exclusive with every other writer; commits when the block ends without an error."""
        conn = self._connection()
        with self._write_lock:
            with self._sqlite_errors():
                conn.execute("BEGIN IMMEDIATE")
            try:
                with self._sqlite_errors():
                    yield Txn(conn)
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every connection; closing twice is fine. Later calls raise Unavailable."""
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        with self._conns_lock:
            if self._closed:
                raise Unavailable("metadata store is closed")
            if conn is not None:
                return conn
            try:
                conn = sqlite3.connect(
                    self.path, timeout=60, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise Unavailable(f"cannot open metadata database {self.path}: {exc}") from exc
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    @staticmethod
    @contextmanager
    def _sqlite_errors() -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise Unavailable(f"metadata database: {exc}") from exc
