"""The collector's hit store: one SQLite table, in memory or in a file.

Every access holds the collector's lock (reentrant): SQLite connections are not
shared across threads safely otherwise.

The store keeps at most `max_hits` hits: a long demo or a load test would
otherwise grow it without limit. The oldest hits go first, in the transaction
that inserts the new ones and before them, so SQLite writes the new hits in
the pages the old ones leave: the table stays the size of `max_hits` hits.
The counts stay exact: `count` is every hit ever stored, `evicted` those
dropped since, and `sites` the hits stored per site.
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

__all__ = ["DEFAULT_MAX_HITS", "MAX_SITES_COUNTED", "HitStore"]

# About 900 bytes a hit of a real app in memory, 170 MB in all
# (bench/results_collector_memory.md): hours of a load test, days of a demo.
DEFAULT_MAX_HITS = 200_000
# Sites counted one by one; the hits of any further site are counted together.
MAX_SITES_COUNTED = 1000

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
    """The stored hits, at most `max_hits` of them (None: no limit).

    `count` is how many hits were stored in all, `evicted` how many of them were
    dropped to stay within `max_hits`, `kept` how many are left; `sites` counts
    the hits stored per site (the first `MAX_SITES_COUNTED` sites; the others
    together in `other_sites`).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None,
        lock: threading.Condition,
        max_hits: int | None = DEFAULT_MAX_HITS,
    ) -> None:
        self._lock = lock
        self.max_hits = max_hits
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
        self.evicted = 0
        self.sites: dict[int, int] = {}
        self.other_sites = 0
        # A file kept from an earlier run: its hits count as stored.
        for site, stored in self._db.execute("SELECT idsite, count(*) FROM hits GROUP BY idsite"):
            self._count_site(site, stored)
        # ... and a smaller max_hits than then keeps the newest of them.
        excess = self._excess(0)
        self._delete_oldest(excess)
        self.evicted = excess

    @property
    def kept(self) -> int:
        return self.count - self.evicted

    def select(self, sql: str, args: Iterable[object]) -> list[StoredHit]:
        with self._lock:
            rows = self._db.execute(sql, tuple(args)).fetchall()
        return [_row_from_db(row) for row in rows]

    def insert(self, rows: list[dict[str, object]]) -> None:
        """Store the rows in one transaction, like Matomo's bulk tracking.

        The oldest hits beyond `max_hits` go in the same transaction.
        """
        columns = ", ".join(rows[0])
        placeholders = ", ".join("?" for _ in rows[0])
        with self._lock:
            excess = self._excess(len(rows))
            # Deleted first, the oldest hits leave the pages the new ones take.
            before = min(excess, self.kept)
            with self._db:
                self._db.execute("BEGIN")
                self._delete_oldest(before)
                self._db.executemany(
                    f"INSERT INTO hits ({columns}) VALUES ({placeholders})",  # noqa: S608
                    [tuple(row.values()) for row in rows],
                )
                self._delete_oldest(excess - before)
            self.count += len(rows)
            self.evicted += excess
            for row in rows:
                site = row["idsite"]
                assert isinstance(site, int)
                self._count_site(site, 1)

    def _count_site(self, site: int, stored: int) -> None:
        if site in self.sites or len(self.sites) < MAX_SITES_COUNTED:
            self.sites[site] = self.sites.get(site, 0) + stored
        else:
            self.other_sites += stored

    def _excess(self, adding: int) -> int:
        """How many of the oldest hits go when `adding` more come."""
        if self.max_hits is None:
            return 0
        return max(0, self.kept + adding - self.max_hits)

    def _delete_oldest(self, excess: int) -> None:
        if excess:
            self._db.execute(
                "DELETE FROM hits WHERE id IN (SELECT id FROM hits ORDER BY id LIMIT ?)",
                (excess,),
            )


def _row_from_db(row: sqlite3.Row) -> StoredHit:
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    return StoredHit(**values)
