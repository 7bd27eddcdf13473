"""The collector's hit store: one SQLite table, in memory or in a file.

Every access holds the collector's lock (reentrant): SQLite connections are not
shared across threads safely otherwise.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from asgi_matomo._collector._model import StoredHit

if TYPE_CHECKING:
    import os

__all__ = ["HitStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    received REAL NOT NULL,
    idsite INTEGER NOT NULL,
    hit_type TEXT NOT NULL,
    url TEXT,
    action_name TEXT,
    urlref TEXT,
    e_c TEXT,
    e_a TEXT,
    e_n TEXT,
    e_v REAL,
    pf_srv INTEGER,
    search TEXT,
    search_cat TEXT,
    search_count INTEGER,
    cvar TEXT,
    cvar_visit TEXT,
    dimensions TEXT NOT NULL,
    visitor_ip TEXT NOT NULL,
    ua TEXT,
    lang TEXT,
    uid TEXT,
    visitor_id TEXT,
    http_status INTEGER,
    params TEXT NOT NULL
)
"""
_JSON_COLUMNS = frozenset({"cvar", "cvar_visit", "dimensions", "params"})


class HitStore:
    """The stored hits; `count` is how many there are."""

    def __init__(self, db_path: str | os.PathLike[str] | None, lock: threading.Condition) -> None:
        self._lock = lock
        self._db = sqlite3.connect(
            ":memory:" if db_path is None else db_path,
            check_same_thread=False,
            isolation_level=None,
        )
        self._db.row_factory = sqlite3.Row
        # A file database: one fsync per checkpoint rather than per hit, and
        # readers (e.g. `sqlite3 hits.sqlite`) do not block the collector.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        weakref.finalize(self, self._db.close)
        self.count: int = self._db.execute("SELECT count(*) FROM hits").fetchone()[0]

    def select(self, sql: str, args: Iterable[object]) -> list[StoredHit]:
        with self._lock:
            rows = self._db.execute(sql, tuple(args)).fetchall()
        return [_row_from_db(row) for row in rows]

    def insert(self, rows: list[dict[str, object]]) -> None:
        """Store the rows in one transaction, like Matomo's bulk tracking."""
        columns = ", ".join(rows[0])
        placeholders = ", ".join("?" for _ in rows[0])
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    f"INSERT INTO hits ({columns}) VALUES ({placeholders})",  # noqa: S608
                    [tuple(row.values()) for row in rows],
                )
            self.count += len(rows)


def _row_from_db(row: sqlite3.Row) -> StoredHit:
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    return StoredHit(**values)
