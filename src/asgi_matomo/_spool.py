"""A durable spool on SQLite for hits that would otherwise be lost."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._hit import Hit
from ._spool_errors import SpoolError, describe_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = ["SpoolError", "SqliteSpool"]

logger = logging.getLogger("asgi_matomo")

# Marks the file as ours (PRAGMA application_id, bytes 68-71 of the header: "asmt"),
# so that a spool_path pointing at somebody else's database is refused untouched.
APPLICATION_ID = 0x61736D74
# Bumped whenever the table layout changes; checked on every open.
SCHEMA_VERSION = 1
# How long a statement waits for another process's write lock before it fails
# with "database is locked". Writers hold it for a few milliseconds at most.
BUSY_TIMEOUT_SECONDS = 10.0
DEFAULT_LEASE_SECONDS = 60.0
# Pause between attempts to switch a new file to WAL while another worker holds it.
WAL_RETRY_SECONDS = 0.01

# AUTOINCREMENT so that an id is never reused: a process still holding the id of a
# row that was dropped (max_rows) must not ack or release a newer row by mistake.
_SCHEMA = (
    """
    CREATE TABLE hits (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        query TEXT NOT NULL,
        timestamp REAL NOT NULL,
        cip TEXT,
        lease_owner TEXT,
        lease_until REAL
    )
    """,
    "CREATE INDEX hits_by_age ON hits (timestamp, id)",
)

# Connections inherited through a fork that bypassed os.register_at_fork. SQLite
# must not touch a parent's connection in the child, not even to close it (its
# locks and WAL index belong to the parent), so they are kept alive, unused.
_INHERITED: list[sqlite3.Connection] = []
# Every open spool, so the fork hooks can close connections before a fork.
_SPOOLS: weakref.WeakSet[SqliteSpool] = weakref.WeakSet()
# The spools whose lock the forking thread holds between the two fork hooks.
_FORKING: list[SqliteSpool] = []


class SqliteSpool:
    """A durable, multi-process queue of hits in one SQLite file.

    Hits put in the spool survive restarts and killed workers. Any number of
    processes may share one file: `claim` leases rows to one instance until they
    are acked (delivered) or released (retry later); a lease not acked within
    `lease_seconds` (a worker killed mid-delivery) expires and the rows become
    claimable again. Methods block: call them from a worker thread. One instance
    may be used from several threads and survives `os.fork()` (the child opens
    its own connection).

        spool = SqliteSpool("/var/lib/myapp/matomo-spool.sqlite3", max_rows=100_000)
        spool.put(hits)
        for row_id, hit in spool.claim(100): ...
        spool.ack(ids)

    Parameters:
        path: the database file (`spool_path`); created if missing. Its directory
            must be writable (SQLite keeps `-wal` and `-shm` files next to it).
        lease_seconds: how long claimed rows stay reserved for this instance.
        max_rows: keep at most this many rows; `put` drops the oldest beyond it.
        clock: the time source for leases (unix seconds), for tests.

    `dropped` counts the rows this instance deleted to honour `max_rows` (hits
    lost); `put` returns nothing, so read it before and after to tell how many.

    Raises `SpoolError` when the file cannot be used: at construction, or in the
    rare reopen after a fork. Otherwise I/O failures (disk full, lock timeout)
    raise `sqlite3.Error` and leave the spool unchanged; methods called after
    `close()` raise `RuntimeError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_rows: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be None or >= 1, got {max_rows!r}")
        self.path = os.fspath(path)
        self.lease_seconds = lease_seconds
        self.max_rows = max_rows
        self.dropped = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._owner = _new_owner()
        self._conn: sqlite3.Connection | None = _open(self.path)
        _SPOOLS.add(self)

    def put(self, hits: Sequence[Hit]) -> None:
        """Store hits in one transaction, dropping the oldest rows beyond `max_rows`.

        With `max_rows` set, the oldest rows (by hit timestamp, leased or not) are
        deleted until at most `max_rows` remain, and `dropped` grows by their number
        (those hits are lost).
        """
        if not hits:
            return
        excess = 0
        with self._locked() as conn:
            with _immediate(conn):
                conn.executemany(
                    "INSERT INTO hits (query, timestamp, cip) VALUES (?, ?, ?)",
                    [(hit.query, hit.timestamp, hit.cip) for hit in hits],
                )
                if self.max_rows is not None:
                    (rows,) = conn.execute("SELECT COUNT(*) FROM hits").fetchone()
                    excess = max(0, rows - self.max_rows)
                    conn.execute(
                        "DELETE FROM hits WHERE id IN"
                        " (SELECT id FROM hits ORDER BY timestamp, id LIMIT ?)",
                        (excess,),
                    )
            # Counted once committed, under the lock: threads share the counter.
            self.dropped += excess
        if excess:
            logger.debug(
                "spool %s full (max_rows=%d): dropped the %d oldest",
                self.path,
                self.max_rows,
                excess,
            )

    def claim(self, limit: int) -> list[tuple[int, Hit]]:
        """Lease up to `limit` of the oldest claimable rows to this instance.

        A row is claimable when it is not leased or its lease has expired. The
        rows stay in the spool, invisible to other claims for `lease_seconds`,
        until `ack` or `release`. Oldest first (hit timestamp, then insertion).
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        if limit == 0:
            return []
        # BEGIN IMMEDIATE takes the write lock before the SELECT, so a second
        # process cannot read the same free rows before this one leases them.
        with self._transaction() as conn:
            now = self._clock()
            rows = conn.execute(
                "SELECT id, query, timestamp, cip FROM hits"
                " WHERE lease_until IS NULL OR lease_until <= ?"
                " ORDER BY timestamp, id LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE hits SET lease_owner = ?, lease_until = ? WHERE id = ?",
                [(self._owner, now + self.lease_seconds, row[0]) for row in rows],
            )
        return [(row_id, Hit(query, timestamp, cip)) for row_id, query, timestamp, cip in rows]

    def ack(self, ids: Sequence[int]) -> None:
        """Delete delivered rows (whoever holds their lease now)."""
        if ids:
            with self._transaction() as conn:
                conn.executemany("DELETE FROM hits WHERE id = ?", [(i,) for i in ids])

    def release(self, ids: Sequence[int]) -> None:
        """Give back this instance's lease on rows that could not be delivered.

        Rows whose lease expired and was taken by another instance stay its.
        """
        if ids:
            with self._transaction() as conn:
                conn.executemany(
                    "UPDATE hits SET lease_owner = NULL, lease_until = NULL"
                    " WHERE id = ? AND lease_owner = ?",
                    [(i, self._owner) for i in ids],
                )

    def count(self) -> int:
        """How many rows are waiting, leased or not."""
        with self._locked() as conn:
            (rows,) = conn.execute("SELECT COUNT(*) FROM hits").fetchone()
        return int(rows)

    def drop_older_than(self, cutoff: float) -> int:
        """Delete rows whose hit timestamp is before `cutoff`; return how many."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM hits WHERE timestamp < ?", (cutoff,)).rowcount

    def close(self) -> None:
        """Close the database connection. Safe to call more than once."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            _SPOOLS.discard(self)
            if conn is None:
                return
            if self._pid == os.getpid():
                conn.close()
            else:
                _INHERITED.append(conn)

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as conn, _immediate(conn):
            yield conn

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"the spool {self.path!r} is closed")
        if self._pid != os.getpid():
            # A fork the hooks did not see (they close the connection first).
            if self._conn is not None:
                _INHERITED.append(self._conn)
                self._conn = None
            self._pid = os.getpid()
            self._owner = _new_owner()
        if self._conn is None:
            self._conn = _open(self.path)
        return self._conn

    def _before_fork(self) -> None:
        # Held until after the fork: no thread may reopen or be mid-transaction.
        self._lock.acquire()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _after_fork_in_child(self) -> None:
        # The child has only the forking thread; the copied lock stays held.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._owner = _new_owner()


def _new_owner() -> str:
    # The pid says which worker holds a lease; the token tells apart two spools
    # in one process and a reused pid.
    return f"{os.getpid()}-{secrets.token_hex(8)}"


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, waiting for it under the busy
    # timeout. A deferred transaction that reads and then writes would instead get
    # "database is locked" at once when another writer came first.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A no-op when SQLite already rolled back by itself.
        conn.rollback()
        raise


def _open(path: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE
            check_same_thread=False,  # one thread at a time, under the spool's lock
        )
    except sqlite3.Error as exc:
        raise describe_error(path, exc, busy_timeout=BUSY_TIMEOUT_SECONDS) from exc
    try:
        _prepare(conn, path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise describe_error(path, exc, busy_timeout=BUSY_TIMEOUT_SECONDS) from exc
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: str) -> None:
    # Refuse a foreign database before changing anything in it (WAL is persistent).
    _check_schema(conn, path)
    mode = _use_wal(conn)
    if mode != "wal":
        raise SpoolError(
            f"spool_path {path!r} cannot use SQLite's WAL journal (got {mode!r}): "
            "pass the path of a file on a local filesystem",
            "no_wal",
        )
    # WAL with synchronous=NORMAL survives an app crash; only a power loss may
    # lose the last transactions, which is fine for hits kept as a fallback.
    conn.execute("PRAGMA synchronous = NORMAL")
    # Checked again under the write lock: another worker may have just created it.
    with _immediate(conn):
        if _check_schema(conn, path):
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        # Written even when unchanged: a read-only file fails here, at startup,
        # rather than when the first hit needs saving.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    (rows,) = conn.execute("SELECT COUNT(*) FROM hits").fetchone()
    logger.debug("spool %s opened with %d hits waiting", path, rows)


def _use_wal(conn: sqlite3.Connection) -> str:
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            # Switching needs an exclusive lock, and SQLite fails at once instead of
            # waiting (deadlock avoidance) while another worker is creating the spool.
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_SECONDS)
        else:
            return str(mode)


def _check_schema(conn: sqlite3.Connection, path: str) -> bool:
    # True when the database is empty and needs the schema; raises if not ours.
    # One statement, so one consistent snapshot: read one by one, the header could
    # change in between as another worker creates the spool.
    application_id, version, objects = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id),"
        " (SELECT user_version FROM pragma_user_version),"
        " (SELECT COUNT(*) FROM sqlite_master)"
    ).fetchone()
    if application_id == 0 and version == 0 and objects == 0:
        return True
    if application_id != APPLICATION_ID:
        raise SpoolError(
            f"spool_path {path!r} is a SQLite database that is not an asgi-matomo "
            "spool: pass the path of a new file instead (it is created)",
            "foreign",
        )
    if version != SCHEMA_VERSION:
        raise SpoolError(
            f"spool_path {path!r} is an asgi-matomo spool of schema version {version}, "
            f"this version reads {SCHEMA_VERSION}: let the asgi-matomo version that wrote "
            "it deliver its hits, or move the file away",
            "version",
        )
    return False


def _before_fork() -> None:
    _FORKING[:] = list(_SPOOLS)
    for spool in _FORKING:
        spool._before_fork()


def _after_fork_in_parent() -> None:
    for spool in _FORKING:
        spool._lock.release()
    _FORKING.clear()


def _after_fork_in_child() -> None:
    for spool in _FORKING:
        spool._after_fork_in_child()
    _FORKING.clear()


# A connection open across fork() is how SQLite files get corrupted
# (https://sqlite.org/howtocorrupt.html#fork): both sides reopen after it instead.
if hasattr(os, "register_at_fork"):  # pragma: no branch (POSIX)
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
