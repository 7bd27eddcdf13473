"""The spool as the middleware uses it: file problems are logged once and survived."""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from asgi_matomo import _spool_guard
from asgi_matomo._hit import Hit
from asgi_matomo._sender import SpoolProtocol
from asgi_matomo._spool import SCHEMA_VERSION, SqliteSpool
from asgi_matomo._spool_errors import SpoolError, problem_of
from asgi_matomo._spool_guard import (
    RETRY_FIRST_SECONDS,
    RETRY_MAX_SECONDS,
    GuardedSpool,
    SpoolUnavailableError,
)
from tests.helpers import FakeClock

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

GARBAGE = bytes(range(256)) * 64


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite3"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="asgi_matomo")
    return caplog


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def hits(n: int, first: int = 0) -> list[Hit]:
    return [Hit(f"idsite=1&rec=1&action_name=p{i}", 1_700_000_000.0 + i) for i in range(first, n)]


def guard(path: Path, clock: FakeClock, **kwargs: Any) -> GuardedSpool:
    return GuardedSpool(path, clock=clock, **kwargs)


class Faulty(SqliteSpool):
    """A real spool whose next operations fail with `fault`, for errors hard to cause."""

    fault: ClassVar[Exception | None] = None
    action: ClassVar[Callable[[], None] | None] = None

    def _check(self) -> None:
        if Faulty.action is not None:
            Faulty.action()
        if Faulty.fault is not None:
            raise Faulty.fault

    def put(self, hits: Any) -> None:
        self._check()
        super().put(hits)

    def claim(self, limit: int) -> list[tuple[int, Hit]]:
        self._check()
        return super().claim(limit)

    def ack(self, ids: Any) -> None:
        self._check()
        super().ack(ids)

    def release(self, ids: Any) -> None:
        self._check()
        super().release(ids)

    def count(self) -> int:
        self._check()
        return super().count()


@pytest.fixture
def faulty() -> Iterator[None]:
    yield
    Faulty.fault = None
    Faulty.action = None


def test_it_is_the_spool_the_sender_expects(path: Path, clock: FakeClock) -> None:
    spool = guard(path, clock)
    expected: SpoolProtocol = spool  # checked by mypy
    spool.put(hits(3))
    assert spool.count() == 3
    rows = spool.claim(2)
    assert [hit for _, hit in rows] == hits(2)
    spool.release([rows[1][0]])
    spool.ack([rows[0][0]])
    assert [hit for _, hit in spool.claim(10)] == hits(3)[1:]
    assert expected.count() == 2
    spool.put([])
    spool.ack([])
    spool.release([])
    spool.close()
    spool.close()
    with pytest.raises(RuntimeError, match="closed"):
        spool.put(hits(1))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (5, TypeError, "spool_path must be a path"),
        (b"/tmp/x", TypeError, "spool_path must be a path"),
        ("", ValueError, "spool_path must name a file"),
        (":memory:", ValueError, "spool_path must name a file"),
    ],
)
def test_a_value_that_can_never_work_is_a_configuration_error(
    value: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        GuardedSpool(value)


def test_a_path_like_of_bytes_is_a_type_error() -> None:
    class BytesPath(os.PathLike[bytes]):
        def __fspath__(self) -> bytes:
            return b"/tmp/spool"

    with pytest.raises(TypeError, match="spool_path must be a str path"):
        GuardedSpool(BytesPath())  # type: ignore[arg-type]


def test_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="is a directory") as info:
        GuardedSpool(tmp_path)
    assert isinstance(info.value, ValueError)


def test_a_garbage_file_is_moved_aside_and_a_new_spool_made(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    path.write_bytes(GARBAGE)
    spool = guard(path, clock)
    spool.put(hits(2))
    assert spool.count() == 2
    [aside] = path.parent.glob("spool.sqlite3.corrupt-*[0-9TZ]")
    # Moved, never deleted: byte for byte.
    assert aside.read_bytes() == GARBAGE
    [line] = errors(logs)
    assert [r.levelname for r in logs.records if r.levelno >= logging.WARNING] == ["ERROR"]
    assert f"spool_path {str(path)!r} is corrupt (file is not a database)" in line
    assert f"moved it aside to {str(aside)!r}" in line
    spool.close()


def test_the_wal_and_shm_of_a_corrupt_file_move_with_it(path: Path, clock: FakeClock) -> None:
    # Left by another worker that still has the file open (the last one to close
    # a database merges its WAL into it and deletes it).
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").write_bytes(suffix.encode() or GARBAGE)
    calls = 0

    def opener(p: str) -> SqliteSpool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SpoolError("not a database", "corrupt")
        return SqliteSpool(p)

    spool = guard(path, clock, opener=opener)
    assert spool.count() == 0
    [aside] = path.parent.glob("spool.sqlite3.corrupt-*[0-9TZ]")
    assert aside.read_bytes() == GARBAGE
    assert Path(f"{aside}-wal").read_bytes() == b"-wal"
    assert Path(f"{aside}-shm").read_bytes() == b"-shm"
    spool.close()


def test_a_truncated_spool_is_moved_aside(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    first = SqliteSpool(path)
    first.put(hits(50))
    first.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    spool = guard(path, clock)
    spool.put(hits(1))
    assert spool.count() == 1
    assert len(list(path.parent.glob("spool.sqlite3.corrupt-*"))) == 1
    assert "is corrupt" in errors(logs)[0]
    spool.close()


def test_names_aside_never_overwrite_an_earlier_one(path: Path, clock: FakeClock) -> None:
    names = set()
    for _ in range(3):
        path.write_bytes(GARBAGE)
        guard(path, clock).close()
        names = {p.name for p in path.parent.glob("spool.sqlite3.corrupt-*")}
    assert len(names) == 3


@pytest.mark.parametrize("kind", ["foreign", "version"])
def test_a_database_that_is_not_ours_is_left_untouched_and_tried_again(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture, kind: str
) -> None:
    if kind == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    else:
        SqliteSpool(path).close()
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    spool = guard(path, clock)
    with pytest.raises(SpoolUnavailableError, match="cannot be used now"):
        spool.put(hits(1))
    assert spool.claim(10) == []
    assert spool.count() == 0
    assert path.read_bytes() == before
    assert list(path.parent.glob("*.corrupt-*")) == []
    [line] = errors(logs)
    assert "not an asgi-matomo spool" in line or "schema version" in line
    assert f"tried again (at most every {RETRY_MAX_SECONDS:g} s)" in line
    # The operator moves it away: the next attempt makes a new spool, no restart.
    path.rename(path.with_name("elsewhere.sqlite3"))
    clock.now += RETRY_FIRST_SECONDS
    spool.put(hits(1))
    assert spool.count() == 1
    assert errors(logs)[1:] == []
    assert f"the spool {str(path)!r} is used again" in logs.records[-1].getMessage()
    spool.close()


def test_count_is_a_probe_too_and_finds_the_hits_already_there(
    path: Path, clock: FakeClock, faulty: None
) -> None:
    # The sender looks at the spool from time to time with count(): once the file
    # can be used again, the hits written before it could not are found.
    spool = guard(path, clock, opener=Faulty)
    spool.put(hits(4))
    Faulty.fault = sqlite3.OperationalError("attempt to write a readonly database")
    assert spool.claim(10) == []
    Faulty.fault = None
    assert spool.count() == 0  # not tried before the backoff
    clock.now += RETRY_FIRST_SECONDS
    assert spool.count() == 4
    assert [hit for _, hit in spool.claim(10)] == hits(4)
    spool.close()


def test_the_file_is_tried_again_with_a_bounded_backoff(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    opened: list[float] = []

    def refuses(p: str) -> SqliteSpool:
        opened.append(clock.now)
        raise SpoolError(f"spool_path {p!r} cannot be opened for writing (readonly)")

    spool = guard(path, clock, opener=refuses)
    while len(opened) < 11:
        assert spool.claim(1) == []
        clock.now += 0.25
    waits = [after - before for before, after in itertools.pairwise(opened)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0]
    # Logged once, however often the file was tried.
    assert len(errors(logs)) == 1
    assert "cannot be opened for writing" in errors(logs)[0]
    spool.close()


def test_a_problem_that_comes_back_is_logged_again_after_an_hour(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture, faulty: None
) -> None:
    spool = guard(path, clock, opener=Faulty)
    for _ in range(3):
        Faulty.fault = sqlite3.OperationalError("database or disk is full")
        with pytest.raises(SpoolUnavailableError):
            spool.put(hits(1))
        Faulty.fault = None
        clock.now += RETRY_MAX_SECONDS
        spool.put(hits(1))
        clock.now += 60
    # The problem, then that it ended: once each.
    assert len(errors(logs)) == 1
    assert [r.getMessage() for r in logs.records].count(
        f"asgi_matomo: the spool {str(path)!r} is used again"
    ) == 1
    clock.now += _spool_guard.LOG_AGAIN_SECONDS
    Faulty.fault = sqlite3.OperationalError("database or disk is full")
    with pytest.raises(SpoolUnavailableError):
        spool.put(hits(1))
    assert len(errors(logs)) == 2
    assert "the disk is full" in errors(logs)[-1]
    spool.close()


def test_a_full_disk_keeps_hits_out_until_space_is_freed(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    # SQLite's own "database or disk is full" (SQLITE_FULL), from a page limit.
    disk_full = True

    def opener(p: str) -> SqliteSpool:
        spool = SqliteSpool(p)
        if disk_full:
            assert spool._conn is not None
            (pages,) = spool._conn.execute("PRAGMA page_count").fetchone()
            spool._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return spool

    spool = guard(path, clock, opener=opener)
    big = [Hit("x" * 10_000, 1.0 + i) for i in range(3)]
    with pytest.raises(SpoolUnavailableError):
        spool.put(big)
    [line] = errors(logs)
    assert "the disk is full" in line
    assert "free some space" in line
    # Meanwhile nothing touches the file; then the disk frees up.
    disk_full = False
    with pytest.raises(SpoolUnavailableError):
        spool.put(big)
    clock.now += RETRY_FIRST_SECONDS
    spool.put(big)
    assert spool.count() == 3
    assert "used again" in logs.records[-1].getMessage()
    spool.close()


def test_a_file_corrupted_while_in_use_is_moved_aside_and_the_hits_land_in_a_new_one(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture, faulty: None
) -> None:
    spool = guard(path, clock, opener=Faulty)
    spool.put(hits(3))
    claimed = spool.claim(1)
    calls = 0

    def fails_once() -> None:
        nonlocal calls
        calls += 1
        Faulty.fault = sqlite3.DatabaseError("database disk image is malformed")
        if calls > 1:
            Faulty.fault = None

    Faulty.action = fails_once
    # The put fails in the corrupt file, which is moved aside; the put goes to a new file.
    spool.put(hits(5, 3))
    assert calls == 2
    Faulty.action = None
    [aside] = path.parent.glob("spool.sqlite3.corrupt-*[0-9TZ]")
    assert SqliteSpool(aside).count() == 3  # kept as it was (here: not really corrupt)
    assert [hit for _, hit in spool.claim(10)] == hits(5, 3)
    # An id from the old file does not ack a row of the new one (ids restart at 1).
    spool.ack([row_id for row_id, _ in claimed])
    spool.release([row_id for row_id, _ in claimed])
    assert spool.count() == 2
    assert "moved it aside" in errors(logs)[0]
    spool.close()


@pytest.mark.parametrize("operation", ["claim", "count", "ack", "release"])
def test_any_operation_finds_a_corrupt_file(
    path: Path, clock: FakeClock, faulty: None, operation: str
) -> None:
    spool = guard(path, clock, opener=Faulty)
    spool.put(hits(2))
    [(row_id, _)] = spool.claim(1)
    Faulty.fault = sqlite3.DatabaseError("file is not a database")
    arguments: dict[str, list[object]] = {
        "claim": [1],
        "count": [],
        "ack": [[row_id]],
        "release": [[row_id]],
    }
    result = getattr(spool, operation)(*arguments[operation])
    assert result in ([], 0, None)
    Faulty.fault = None
    assert len(list(path.parent.glob("spool.sqlite3.corrupt-*[0-9TZ]"))) == 1
    assert spool.count() == 0
    spool.close()


def test_a_put_that_finds_the_new_file_corrupt_too_gives_up(
    path: Path, clock: FakeClock, faulty: None, logs: pytest.LogCaptureFixture
) -> None:
    spool = guard(path, clock, opener=Faulty)
    Faulty.fault = sqlite3.DatabaseError("database disk image is malformed")
    with pytest.raises(SpoolUnavailableError):
        spool.put(hits(1))
    # Moved aside twice, under two names, and logged once.
    assert len(list(path.parent.glob("spool.sqlite3.corrupt-*[0-9TZ]"))) == 2
    assert len(errors(logs)) == 1
    spool.close()


def test_a_file_another_worker_moved_aside_is_not_moved_again(
    path: Path, clock: FakeClock, faulty: None
) -> None:
    spool = guard(path, clock, opener=Faulty)
    spool.put(hits(1))

    def other_worker_moves_it() -> None:
        Faulty.action = None
        path.rename(path.with_name("aside"))
        SqliteSpool(path).close()  # and made a new spool

    Faulty.action = other_worker_moves_it
    Faulty.fault = sqlite3.DatabaseError("database disk image is malformed")
    assert spool.claim(10) == []
    Faulty.fault = None
    assert sorted(p.name for p in path.parent.iterdir() if "-" not in p.name) == [
        "aside",
        "spool.sqlite3",
    ]
    spool.put(hits(1))
    assert spool.count() == 1
    spool.close()


def test_a_file_deleted_or_replaced_while_in_use_is_made_again(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    spool = guard(path, clock)
    spool.put(hits(1))
    [(row_id, _)] = spool.claim(1)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    spool.put(hits(3))
    assert path.exists()
    spool.ack([row_id])  # from the deleted file: ignored
    assert spool.count() == 3
    assert errors(logs) == [
        f"asgi_matomo: the spool {str(path)!r} was moved or deleted while in use:"
        " a new one is made at that path"
    ]
    spool.close()


def test_a_corrupt_file_that_cannot_be_moved_aside(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path.write_bytes(GARBAGE)

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "rename", refuse)
    spool = guard(path, clock)
    assert spool.count() == 0
    [line] = errors(logs)
    assert "could not be moved aside (" in line
    assert "Permission denied" in line
    assert "move it away yourself" in line
    assert path.read_bytes() == GARBAGE
    monkeypatch.undo()
    clock.now += RETRY_FIRST_SECONDS
    spool.put(hits(1))
    assert spool.count() == 1
    spool.close()


def test_when_every_name_aside_is_taken(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path.write_bytes(GARBAGE)
    monkeypatch.setattr(os.path, "lexists", lambda p: True)
    spool = guard(path, clock)
    monkeypatch.undo()
    assert "all exist" in errors(logs)[0]
    assert path.read_bytes() == GARBAGE
    spool.close()


def test_a_corrupt_file_whose_replacement_cannot_be_made(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    path.write_bytes(GARBAGE)
    calls = 0

    def opener(p: str) -> SqliteSpool:
        nonlocal calls
        calls += 1
        if calls == 1:
            return SqliteSpool(p)
        raise sqlite3.OperationalError("unable to open database file")

    spool = guard(path, clock, opener=opener)
    assert spool.count() == 0
    assert ["is corrupt (" in line for line in errors(logs)] == [True, False]
    assert "cannot be opened for writing" in errors(logs)[1]
    spool.close()


@pytest.mark.parametrize(
    "fault",
    [
        sqlite3.OperationalError("database is locked"),  # waits of another process: transient
        ValueError("a bug"),
    ],
)
def test_errors_that_say_nothing_about_the_file_reach_the_caller(
    path: Path, clock: FakeClock, faulty: None, fault: Exception, logs: pytest.LogCaptureFixture
) -> None:
    spool = guard(path, clock, opener=Faulty)
    Faulty.fault = fault
    row = 1 << _spool_guard._GEN_BITS | 1  # row 1 of the first open
    operations: list[Callable[[], object]] = [
        lambda: spool.put(hits(1)),
        lambda: spool.claim(1),
        spool.count,
        lambda: spool.ack([row]),
        lambda: spool.release([row]),
    ]
    for operation in operations:
        with pytest.raises(type(fault)):
            operation()
    Faulty.fault = None
    spool.put(hits(1))
    assert spool.count() == 1
    assert errors(logs) == []
    spool.close()


def test_unexpected_errors_at_open_are_survived_too(
    path: Path, clock: FakeClock, logs: pytest.LogCaptureFixture
) -> None:
    def broken(p: str) -> SqliteSpool:
        raise OSError("something odd")

    spool = guard(path, clock, opener=broken)
    with pytest.raises(SpoolUnavailableError):
        spool.put(hits(1))
    assert "cannot be used (OSError: something odd)" in errors(logs)[0]
    spool.close()


def test_settling_ids_while_the_file_is_unusable_leaves_them_to_their_lease(
    path: Path, clock: FakeClock, faulty: None
) -> None:
    spool = guard(path, clock, opener=Faulty)
    spool.put(hits(2))
    rows = spool.claim(2)
    Faulty.fault = sqlite3.OperationalError("attempt to write a readonly database")
    assert spool.count() == 0  # the failure: closed, tried again later
    Faulty.fault = None
    spool.ack([rows[0][0]])  # not tried now: the lease expires, the row comes back
    spool.release([rows[1][0]])
    clock.now += RETRY_FIRST_SECONDS
    assert spool.count() == 2
    # Ids of an earlier open are not trusted: the leases expire instead.
    spool.ack([rows[0][0]])
    assert spool.count() == 2
    assert spool.claim(10) == []
    spool.close()


def test_a_file_that_cannot_be_looked_at_after_opening_is_not_taken_for_replaced(
    path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spool_guard, "_identity", lambda p: None)
    spool = guard(path, clock)
    spool.put(hits(1))
    assert spool.count() == 1
    spool.close()


def test_a_failure_another_thread_already_dealt_with(path: Path, clock: FakeClock) -> None:
    spool = guard(path, clock)
    stale = SqliteSpool(path)
    # A spool object that is no longer the current one: its error is not ours to handle.
    assert spool._failed(stale, RuntimeError("closed")) is True
    stale.close()
    spool.close()


def test_the_fork_hook_gives_the_child_a_fresh_lock(path: Path, clock: FakeClock) -> None:
    spool = guard(path, clock)
    spool._lock.acquire()  # held by a thread that does not exist in the child
    _spool_guard._after_fork_in_child()
    spool.put(hits(1))
    assert spool.count() == 1
    spool.close()


def test_a_spool_that_fails_to_close_is_given_up_quietly(
    path: Path, clock: FakeClock, faulty: None, logs: pytest.LogCaptureFixture
) -> None:
    class BadClose(Faulty):
        def close(self) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    spool = guard(path, clock, opener=BadClose)
    Faulty.fault = sqlite3.OperationalError("disk I/O error")
    assert spool.claim(1) == []
    assert "closing the spool failed" in logs.text
    spool._spool = None
    spool.close()


@pytest.mark.parametrize(
    ("make_error", "problem"),
    [
        (lambda p: sqlite3.connect(p).execute("SELECT * FROM sqlite_master"), "corrupt"),
        (lambda p: sqlite3.connect(p / "no" / "x.db").execute("SELECT 1"), "unwritable"),
    ],
)
def test_problem_of_real_sqlite_errors(
    tmp_path: Path, make_error: Callable[[Path], object], problem: str
) -> None:
    target = tmp_path / "garbage.db"
    target.write_bytes(GARBAGE)
    with pytest.raises(sqlite3.Error) as info:
        make_error(target if problem == "corrupt" else tmp_path)
    assert problem_of(info.value) == problem


def test_problem_of_a_read_only_connection(path: Path) -> None:
    SqliteSpool(path).close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as info:
        conn.execute("DELETE FROM hits")
    conn.close()
    assert problem_of(info.value) == "unwritable"


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("database disk image is malformed", "corrupt"),
        ("file is not a database", "corrupt"),
        ("database or disk is full", "full"),
        ("database is locked", "locked"),
        ("attempt to write a readonly database", "unwritable"),
        ("unable to open database file", "unwritable"),
        ("disk I/O error", "unwritable"),
        ("no such table: hits", None),
    ],
)
def test_problem_of_messages_without_codes(message: str, problem: str | None) -> None:
    # Python 3.10 has no sqlite_errorcode: the message says it.
    assert problem_of(sqlite3.OperationalError(message)) == problem
    assert problem_of(ValueError(message)) is None
