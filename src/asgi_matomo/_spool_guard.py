"""The spool as the middleware uses it: a file problem degrades tracking, never the app.

A spool is a fallback. A full disk, a read-only mount, a corrupt or foreign file,
at start-up or later, must not keep the app from starting or serving: `GuardedSpool`
logs the problem once (ERROR, with what to do), keeps hits in memory meanwhile
(the sender drops and counts what does not fit), moves a corrupt file aside, and
tries the file again with a bounded backoff, so that a disk that frees up is used
again without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from ._spool import BUSY_TIMEOUT_SECONDS, SqliteSpool
from ._spool_errors import SpoolError, describe_error, problem_of

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._hit import Hit
    from ._spool_errors import Problem

__all__ = ["GuardedSpool", "SpoolUnavailableError"]

logger = logging.getLogger("asgi_matomo")

# After a failure the file is left alone for 1, 2, 4 ... up to 30 seconds: a
# probe costs one open (a few system calls and reads), and a disk that frees up
# is used again within half a minute.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
# A problem that comes back is logged at ERROR again only after this long: a
# disk that keeps filling up and freeing must not fill the log.
LOG_AGAIN_SECONDS = 3600.0
# Row ids handed out carry the generation of the open they came from in their
# low bits: an id claimed from a file that was since moved aside must not ack
# or release a row of its replacement (ids restart at 1 in a new file). Ids of
# an earlier open are ignored: their leases expire and the rows are sent again.
_GEN_BITS = 16
_GEN_MASK = (1 << _GEN_BITS) - 1
# Names tried for a corrupt file before giving up on moving it aside.
_MAX_ASIDE_NAMES = 100

# Every guard, so that a forked child gets fresh locks (see _after_fork_in_child).
_GUARDS: weakref.WeakSet[GuardedSpool] = weakref.WeakSet()

_Identity = tuple[int, int]
_T = TypeVar("_T")


class SpoolUnavailableError(Exception):
    """The spool cannot take hits now; the problem was logged when it appeared."""


class GuardedSpool:
    """A `SqliteSpool` whose file problems are logged and survived, not raised.

    Satisfies the sender's `SpoolProtocol`. While the file cannot be used, `put`
    raises `SpoolUnavailableError` (the sender then drops and counts the hits), `claim`
    returns nothing and `count` 0. Errors that say nothing about the file (a lock
    held too long by another process) reach the caller as before.

        spool = GuardedSpool("/var/lib/myapp/matomo-spool.sqlite3")

    Raises `TypeError`/`ValueError` (naming `spool_path`) only for a value that
    can never work: not a path, empty, `:memory:`, or an existing directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        opener: Callable[[str], SqliteSpool] = SqliteSpool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = _checked_path(path)
        self._opener = opener
        self._clock = clock
        self._lock = threading.Lock()
        self._spool: SqliteSpool | None = None
        self._identity: _Identity | None = None  # the file last opened
        self._generation = 0
        self._closed = False
        self._failures = 0
        self._retry_at = -float("inf")
        self._problem: Problem | None = None
        self._logged: dict[Problem, float] = {}
        self._announced = False  # a problem was logged at ERROR, not yet its end
        _GUARDS.add(self)
        # Opened now, so that a problem is in the log at start-up.
        with self._lock:
            self._open()

    # -- SpoolProtocol ------------------------------------------------------------------

    def put(self, hits: Sequence[Hit]) -> int | None:
        """Store hits; raises `SpoolUnavailableError` while the file cannot be used."""
        if not hits:
            return None
        # Twice at most: after a corrupt file was moved aside, into its replacement.
        for _ in range(2):
            current = self._current()
            if current is None:
                break
            spool, _generation = current
            if self._guarded(spool, partial(_put, spool, hits), False):
                return None
        raise SpoolUnavailableError(
            f"the spool {self.path!r} cannot be used now (see the ERROR logged about it)"
        )

    def claim(self, limit: int) -> list[tuple[int, Hit]]:
        """Lease up to `limit` of the oldest hits; nothing while the file cannot be used."""
        current = self._current()
        if current is None:
            return []
        spool, generation = current
        rows: list[tuple[int, Hit]] = self._guarded(spool, partial(spool.claim, limit), [])
        return [(row_id << _GEN_BITS | generation, hit) for row_id, hit in rows]

    def ack(self, ids: Sequence[int]) -> None:
        """Delete delivered rows; ids of a file since replaced are ignored."""
        self._settle(ids, ack=True)

    def release(self, ids: Sequence[int]) -> None:
        """Give back leases; ids of a file since replaced are ignored."""
        self._settle(ids, ack=False)

    def count(self) -> int:
        """How many hits are waiting; 0 while the file cannot be used."""
        current = self._current()
        if current is None:
            return 0
        spool, _generation = current
        return self._guarded(spool, spool.count, 0)

    def close(self) -> None:
        """Close the file. Safe to call more than once."""
        with self._lock:
            self._closed = True
            spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    # -- the file's state -----------------------------------------------------------------

    def _settle(self, ids: Sequence[int], *, ack: bool) -> None:
        if not ids:
            return
        current = self._current()
        if current is None:
            # Their leases expire and another claim sends them again (at least once).
            return
        spool, generation = current
        mine = [i >> _GEN_BITS for i in ids if i & _GEN_MASK == generation]
        if not mine:
            return
        self._guarded(spool, partial(spool.ack if ack else spool.release, mine), None)

    def _guarded(self, spool: SqliteSpool, operation: Callable[[], _T], failed: _T) -> _T:
        """`operation` on `spool`; `failed` when its error was about the file (dealt with)."""
        try:
            result = operation()
        except Exception as exc:
            if not self._failed(spool, exc):
                raise
            return failed
        self._succeeded()
        return result

    def _current(self) -> tuple[SqliteSpool, int] | None:
        """The open spool and its generation, opening it when due; None if unusable."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the spool {self.path!r} is closed")
            if (
                self._spool is not None
                and self._identity is not None
                and _identity(self.path) != self._identity
            ):
                # Moved aside (by another worker that found it corrupt) or deleted:
                # hits written to the old inode would never be read again.
                logger.warning(
                    "asgi_matomo: the spool %r was moved or deleted while in use:"
                    " a new one is made at that path",
                    self.path,
                )
                _close_quietly(self._spool)
                self._spool = None
                self._retry_at = -float("inf")
            if self._spool is None and self._clock() >= self._retry_at:
                self._open()
            if self._spool is None:
                return None
            return self._spool, self._generation

    def _open(self) -> None:
        # Under the lock. Sets self._spool, or records and logs why not.
        before = _identity(self.path)
        try:
            spool = self._opener(self.path)
        except Exception as exc:
            problem = problem_of(exc) or "unwritable"
            if problem == "corrupt":
                self._corrupt(exc, before)
            else:
                self._fail(problem, _reason(self.path, exc))
        else:
            self._opened(spool)

    def _corrupt(self, exc: Exception, identity: _Identity | None) -> None:
        # Only the file found corrupt is moved: when another worker got there
        # first, the path already names its fresh spool.
        same_file = identity is not None and _identity(self.path) == identity
        if same_file and not self._move_aside(exc):
            return
        try:
            spool = self._opener(self.path)
        except Exception as error:
            self._fail(problem_of(error) or "unwritable", _reason(self.path, error))
        else:
            self._opened(spool)

    def _opened(self, spool: SqliteSpool) -> None:
        # A new generation at every open, even of the same path: a file deleted
        # and made again may well get the inode number of the old one.
        self._generation = (self._generation + 1) & _GEN_MASK
        self._identity = _identity(self.path)
        self._spool = spool

    def _succeeded(self) -> None:
        # The backoff and the problem end with an operation that worked, not with
        # an open: a full disk may well open. Checked without the lock first, to
        # keep the common path free of it.
        if self._failures or self._problem is not None:
            with self._lock:
                self._failures = 0
                self._problem = None
                if self._announced:
                    self._announced = False
                    logger.info("asgi_matomo: the spool %r is used again", self.path)

    def _failed(self, spool: SqliteSpool, exc: Exception) -> bool:
        """Deal with an operation's error; False when it says nothing about the file."""
        with self._lock:
            if self._spool is not spool:
                # Another thread already dealt with this file (and may have closed it).
                return True
            problem = problem_of(exc)
            if problem is None or problem == "locked":
                return False
            self._spool = None
            _close_quietly(spool)
            if problem == "corrupt":
                self._corrupt(exc, self._identity)
            else:
                self._fail(problem, _reason(self.path, exc))
            return True

    def _fail(self, problem: Problem, reason: str) -> None:
        self._failures += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** min(self._failures - 1, 32))
        self._retry_at = self._clock() + delay
        self._problem = problem
        self._announced |= self._report(
            problem,
            "asgi_matomo: %s. Tracking goes on in memory meanwhile: hits that would have"
            " been spooled are dropped and counted. The file is tried again (at most every"
            " %g s) as long as the app runs: no restart is needed once it is fixed",
            reason,
            RETRY_MAX_SECONDS,
        )

    def _move_aside(self, exc: Exception) -> bool:
        """Rename a corrupt file (and its -wal and -shm) next to itself; True if done."""
        try:
            aside = _rename_aside(self.path)
        except OSError as error:
            self._fail(
                "corrupt",
                f"spool_path {self.path!r} is corrupt ({_cause(exc)}) and could not be moved"
                f" aside ({error}): move it away yourself",
            )
            return False
        self._report(
            "corrupt",
            "asgi_matomo: spool_path %r is corrupt (%s): moved it aside to %r (its hits are"
            " not sent; the file is kept for inspection, delete it when done) and started"
            " a new spool",
            self.path,
            _cause(exc),
            aside,
        )
        return True

    def _report(self, problem: Problem, message: str, *args: object) -> bool:
        """Log at ERROR, or at DEBUG when this problem was logged lately; True if ERROR."""
        now = self._clock()
        last = self._logged.get(problem)
        if last is not None and now - last < LOG_AGAIN_SECONDS:
            logger.debug(message, *args)
            return False
        self._logged[problem] = now
        logger.error(message, *args)
        return True

    def _after_fork_in_child(self) -> None:
        # The forking thread may have held the lock; only it existed to release it.
        self._lock = threading.Lock()


def _checked_path(path: str | os.PathLike[str]) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"spool_path must be a path, got {path!r}")
    value = os.fspath(path)
    if not isinstance(value, str):
        raise TypeError(f"spool_path must be a str path, got {path!r}")
    if value in ("", ":memory:"):
        raise ValueError(
            f"spool_path must name a file (it is created), got {value!r}: SQLite would"
            " keep the spool in memory, where it survives nothing"
        )
    if os.path.isdir(value):
        raise SpoolError(
            f"spool_path {value!r} is a directory: pass the path of a file in it, "
            f"e.g. {os.path.join(value, 'asgi-matomo-spool.sqlite3')!r}",
            "directory",
        )
    return value


def _identity(path: str) -> _Identity | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _rename_aside(path: str) -> str:
    # The database first: from then on a new file is created at `path`. Its -wal
    # follows at once (a WAL left behind would be read into the new file).
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(_MAX_ASIDE_NAMES):
        aside = f"{path}.corrupt-{stamp}" + (f"-{n}" if n else "")
        if not any(os.path.lexists(aside + suffix) for suffix in ("", "-wal", "-shm")):
            break
    else:
        raise FileExistsError(f"{path}.corrupt-{stamp}-* all exist")
    os.rename(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, aside + suffix)
    return aside


def _reason(path: str, exc: BaseException) -> str:
    # What is wrong and what to do, as SqliteSpool says it when it opens the file.
    if isinstance(exc, SpoolError):
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        return str(describe_error(path, exc, busy_timeout=BUSY_TIMEOUT_SECONDS))
    return f"spool_path {path!r} cannot be used ({type(exc).__name__}: {exc})"


def _cause(exc: BaseException) -> str:
    # SQLite's own words, without the advice around them (given once, by the caller).
    cause = exc.__cause__ if isinstance(exc, SpoolError) else exc
    return str(cause if cause is not None else exc)


def _put(spool: SqliteSpool, hits: Sequence[Hit]) -> bool:
    # True once stored: GuardedSpool._guarded answers False when the file failed.
    spool.put(hits)
    return True


def _close_quietly(spool: SqliteSpool) -> None:
    try:
        spool.close()
    except Exception as exc:  # a broken file may fail to close too; it is given up anyway
        logger.debug("asgi_matomo: closing the spool failed: %r", exc)


def _after_fork_in_child() -> None:
    for guard in list(_GUARDS):
        guard._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # pragma: no branch (POSIX)
    os.register_at_fork(after_in_child=_after_fork_in_child)
