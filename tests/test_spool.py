from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from asgi_matomo import _spool
from asgi_matomo._hit import Hit
from asgi_matomo._sender import SpoolProtocol
from asgi_matomo._spool import SCHEMA_VERSION, SpoolError, SqliteSpool
from tests.helpers import FakeClock

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.synchronize import Event

START = 1_700_000_000.0
LEASE = 60.0
CLAIM_BATCH = 7


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite3"


@pytest.fixture
def spool(path: Path, clock: FakeClock) -> Iterator[SqliteSpool]:
    spool = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    yield spool
    spool.close()


def make_hits(n: int, start: float = START) -> list[Hit]:
    return [Hit(f"idsite=1&rec=1&action_name=page{i}", start + i, "192.0.2.1") for i in range(n)]


def ids_of(rows: list[tuple[int, Hit]]) -> list[int]:
    return [row_id for row_id, _ in rows]


def hits_of(rows: list[tuple[int, Hit]]) -> list[Hit]:
    return [hit for _, hit in rows]


@pytest.mark.parametrize(
    "hit",
    [
        Hit("idsite=1&rec=1&url=http%3A%2F%2Fexample.com%2F", START),
        Hit("idsite=1&rec=1", 1_700_000_000.123456, "192.0.2.1"),
        Hit("idsite=1&rec=1", 0.1 + 0.2, "2001:db8::1"),
        Hit("action_name=caf\u00e9 \u65e5\u672c \U0001f600&e_c=\u00fc", START, "\u00e9"),
        Hit("idsite=1&rec=1&url=" + "x" * 100_000, START, None),
        Hit("", START, ""),
    ],
)
def test_round_trip_keeps_query_timestamp_and_cip_exactly(spool: SqliteSpool, hit: Hit) -> None:
    spool.put([hit])
    [(_, got)] = spool.claim(10)
    assert got == hit
    assert type(got.timestamp) is float


def test_it_is_the_spool_the_sender_expects(spool: SqliteSpool) -> None:
    expected: SpoolProtocol = spool  # checked by mypy
    assert expected is spool


def test_rows_survive_close_and_reopen(path: Path) -> None:
    hits = make_hits(5)
    first = SqliteSpool(path)
    first.put(hits)
    first.close()

    second = SqliteSpool(path)
    try:
        assert second.count() == 5
        assert hits_of(second.claim(10)) == hits
    finally:
        second.close()


def test_claim_is_oldest_first_by_timestamp_then_insertion(spool: SqliteSpool) -> None:
    late, early, tie_a, tie_b = (
        Hit("late", START + 10),
        Hit("early", START - 10),
        Hit("tie_a", START),
        Hit("tie_b", START),
    )
    spool.put([late, tie_a])
    spool.put([tie_b, early])
    assert hits_of(spool.claim(2)) == [early, tie_a]
    assert hits_of(spool.claim(2)) == [tie_b, late]
    assert spool.claim(2) == []


def test_claimed_rows_are_leased_until_acked_or_released(spool: SqliteSpool) -> None:
    spool.put(make_hits(5))
    first = spool.claim(3)
    assert len(first) == 3
    assert spool.count() == 5  # leased rows still wait
    rest = spool.claim(10)
    assert hits_of(rest) == make_hits(5)[3:]

    spool.release(ids_of(first))
    again = spool.claim(10)
    assert again == first

    spool.ack(ids_of(again))
    assert spool.count() == 2
    spool.ack(ids_of(rest))
    assert spool.count() == 0
    assert spool.claim(10) == []


def test_ack_and_release_ignore_unknown_ids_and_empty_lists(spool: SqliteSpool) -> None:
    spool.put(make_hits(2))
    spool.ack([])
    spool.release([])
    spool.ack([12345])
    spool.release([12345])
    assert spool.count() == 2


@pytest.mark.parametrize(("limit", "expected"), [(0, 0), (1, 1), (3, 3), (100, 3)])
def test_claim_limit(spool: SqliteSpool, limit: int, expected: int) -> None:
    spool.put(make_hits(3))
    assert len(spool.claim(limit)) == expected


def test_claim_rejects_a_negative_limit(spool: SqliteSpool) -> None:
    with pytest.raises(ValueError, match="limit"):
        spool.claim(-1)


def test_lease_expires_after_lease_seconds(path: Path, clock: FakeClock) -> None:
    worker = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    other = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    try:
        worker.put(make_hits(3))
        claimed = worker.claim(10)
        clock.now += LEASE - 0.001
        assert other.claim(10) == []
        clock.now += 0.001
        assert other.claim(10) == claimed
    finally:
        worker.close()
        other.close()


def test_release_gives_back_only_a_lease_still_held(path: Path, clock: FakeClock) -> None:
    slow = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    fast = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    third = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    try:
        slow.put(make_hits(2))
        stale = slow.claim(10)
        clock.now += LEASE
        assert fast.claim(10) == stale
        slow.release(ids_of(stale))  # too late: the rows are fast's now
        assert third.claim(10) == []
        fast.release(ids_of(stale))
        assert third.claim(10) == stale
    finally:
        slow.close()
        fast.close()
        third.close()


def test_ack_deletes_rows_whoever_holds_the_lease(path: Path, clock: FakeClock) -> None:
    slow = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    fast = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
    try:
        slow.put(make_hits(2))
        stale = slow.claim(10)
        clock.now += LEASE
        assert fast.claim(10) == stale
        slow.ack(ids_of(stale))  # delivered after all
        assert fast.count() == 0
        fast.ack(ids_of(stale))
        assert fast.count() == 0
    finally:
        slow.close()
        fast.close()


def test_two_instances_on_one_file_never_claim_the_same_row(path: Path, clock: FakeClock) -> None:
    a = SqliteSpool(path, clock=clock)
    b = SqliteSpool(path, clock=clock)
    try:
        a.put(make_hits(50))
        claimed: list[int] = []
        while rows := a.claim(3) + b.claim(4):
            claimed += ids_of(rows)
        assert len(claimed) == 50
        assert len(set(claimed)) == 50
    finally:
        a.close()
        b.close()


def test_threads_sharing_one_instance_claim_each_row_once(spool: SqliteSpool) -> None:
    spool.put(make_hits(500))
    start = threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def work(mine: list[int]) -> None:
        start.wait()
        while rows := spool.claim(CLAIM_BATCH):
            mine += ids_of(rows)
            spool.ack(ids_of(rows))

    threads = [threading.Thread(target=work, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [row_id for mine in claimed for row_id in mine]
    assert len(everything) == 500
    assert len(set(everything)) == 500
    assert spool.count() == 0


def _deliver_until_empty(path: str, out: str, start: Event) -> None:
    # Runs in a spawned process: claim, sometimes give a batch back, ack the rest.
    spool = SqliteSpool(path)
    delivered: list[int] = []
    try:
        start.wait()
        batches = 0
        while rows := spool.claim(CLAIM_BATCH):
            batches += 1
            if batches % 5 == 0:
                spool.release(ids_of(rows))
                continue
            spool.ack(ids_of(rows))
            delivered += ids_of(rows)
    finally:
        spool.close()
    Path(out).write_text("\n".join(map(str, delivered)))


def _put_hits(path: str, start: Event, worker: int) -> None:
    start.wait()
    spool = SqliteSpool(path)
    try:
        for batch in range(10):
            spool.put(make_hits(20, start=START + worker * 1000 + batch * 20))
    finally:
        spool.close()


def _claim_and_get_killed(path: str) -> None:
    spool = SqliteSpool(path, lease_seconds=3600.0)
    spool.claim(10)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_processes_sharing_one_file_deliver_every_row_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path)
    try:
        spool.put(make_hits(2000))
        expected = ids_of(spool.claim(2000))
        spool.release(expected)
    finally:
        spool.close()

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outs = [tmp_path / f"delivered-{n}.txt" for n in range(4)]
    workers = [
        ctx.Process(target=_deliver_until_empty, args=(str(path), str(out), start)) for out in outs
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]

    delivered: dict[int, int] = {}
    for out in outs:
        for line in out.read_text().split():
            delivered[int(line)] = delivered.get(int(line), 0) + 1
    assert sorted(delivered) == sorted(expected)
    assert set(delivered.values()) == {1}

    spool = SqliteSpool(path)
    try:
        assert spool.count() == 0
    finally:
        spool.close()


@pytest.mark.slow
def test_processes_create_and_fill_a_new_file_concurrently(path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_put_hits, args=(str(path), start, n)) for n in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]

    spool = SqliteSpool(path)
    try:
        assert spool.count() == 4 * 10 * 20
    finally:
        spool.close()


@pytest.mark.slow
def test_rows_leased_by_a_killed_process_come_back_when_the_lease_expires(path: Path) -> None:
    spool = SqliteSpool(path)
    try:
        spool.put(make_hits(10))
    finally:
        spool.close()

    worker = multiprocessing.get_context("spawn").Process(
        target=_claim_and_get_killed, args=(str(path),)
    )
    worker.start()
    worker.join()
    assert worker.exitcode == -signal.SIGKILL

    now = FakeClock(START)
    successor = SqliteSpool(path, clock=now)
    try:
        assert successor.count() == 10
        # The dead worker's lease runs for an hour from (real) now.
        now.now = time.time() + 3000
        assert successor.claim(10) == []
        now.now += 601
        assert hits_of(successor.claim(10)) == make_hits(10)
    finally:
        successor.close()


@pytest.mark.parametrize(
    ("max_rows", "batches", "dropped", "left"),
    [
        (None, [5, 5], [0, 0], 10),
        (10, [5, 5], [0, 0], 10),
        (10, [5, 5, 3], [0, 0, 3], 10),
        (3, [5], [2], 3),
        (1, [1, 1, 1], [0, 1, 1], 1),
    ],
)
def test_max_rows_drops_the_oldest(
    path: Path, max_rows: int | None, batches: list[int], dropped: list[int], left: int
) -> None:
    spool = SqliteSpool(path, max_rows=max_rows)
    try:
        everything: list[Hit] = []
        results = []
        for size in batches:
            hits = make_hits(size, start=START + len(everything))
            everything += hits
            before = spool.dropped
            spool.put(hits)
            results.append(spool.dropped - before)
        assert results == dropped
        assert spool.dropped == sum(dropped)
        assert spool.count() == left
        assert hits_of(spool.claim(100)) == everything[-left:]
    finally:
        spool.close()


def test_max_rows_keeps_the_oldest_by_hit_time_not_insertion(path: Path) -> None:
    spool = SqliteSpool(path, max_rows=2)
    try:
        spool.put([Hit("new", START + 100)])
        spool.put([Hit("old", START), Hit("middle", START + 50)])
        assert spool.dropped == 1
        assert [hit.query for hit in hits_of(spool.claim(10))] == ["middle", "new"]
    finally:
        spool.close()


def test_put_nothing(spool: SqliteSpool) -> None:
    spool.put([])
    assert spool.count() == 0


def test_drop_older_than(spool: SqliteSpool) -> None:
    spool.put(make_hits(10))
    leased = spool.claim(1)
    assert spool.drop_older_than(START + 3) == 3  # leased or not
    assert spool.drop_older_than(START + 3) == 0
    assert spool.count() == 7
    spool.ack(ids_of(leased))
    assert hits_of(spool.claim(100)) == make_hits(10)[3:]


def test_a_failed_put_changes_nothing(spool: SqliteSpool) -> None:
    spool.put(make_hits(2))
    with pytest.raises(UnicodeEncodeError):
        spool.put([*make_hits(3), Hit("lone \udc80 surrogate", START)])
    assert spool.count() == 2
    spool.put(make_hits(1))
    assert spool.count() == 3


def test_close_is_idempotent_and_the_spool_unusable_afterwards(path: Path) -> None:
    spool = SqliteSpool(path)
    spool.put(make_hits(1))
    spool.close()
    spool.close()
    with pytest.raises(RuntimeError, match="closed"):
        spool.count()
    with pytest.raises(RuntimeError, match="closed"):
        spool.put(make_hits(1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lease_seconds": 0.0}, "lease_seconds"),
        ({"lease_seconds": -1.0}, "lease_seconds"),
        ({"lease_seconds": float("nan")}, "lease_seconds"),
        ({"max_rows": 0}, "max_rows"),
    ],
)
def test_invalid_options(path: Path, kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SqliteSpool(path, **kwargs)  # type: ignore[arg-type]
    assert not path.exists()


def _assert_spool_error(path: Path, *needles: str) -> SpoolError:
    with pytest.raises(SpoolError) as info:
        SqliteSpool(path).close()
    message = str(info.value)
    assert message.startswith(f"spool_path {str(path)!r}")
    # A configuration error like any other option's.
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in message
    return info.value


def test_a_garbage_file_is_refused(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)
    error = _assert_spool_error(path, "not a usable SQLite database", "move the file away")
    assert isinstance(error.__cause__, sqlite3.DatabaseError)


def test_a_corrupted_spool_is_refused(path: Path) -> None:
    SqliteSpool(path).close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # page 1 after the header: sqlite_master
    path.write_bytes(bytes(data))
    error = _assert_spool_error(path, "malformed", "move the file away")
    assert isinstance(error.__cause__, sqlite3.DatabaseError)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    error = _assert_spool_error(tmp_path, "is a directory", "asgi-matomo-spool.sqlite3")
    assert isinstance(error.__cause__, sqlite3.OperationalError)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    error = _assert_spool_error(tmp_path / "file" / "spool.sqlite3", "cannot be opened")
    assert isinstance(error.__cause__, sqlite3.OperationalError)


def test_a_directory_that_does_not_exist_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    _assert_spool_error(missing / "spool.sqlite3", f"{str(missing)!r} is not an existing directory")


def test_a_read_only_filesystem_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class ReadOnly:
        f_flag = os.ST_RDONLY

    # Opening a new file fails as on a read-only mount; the mount flag says why.
    monkeypatch.setattr(sqlite3, "connect", _raises(sqlite3.OperationalError("unable to open")))
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    _assert_spool_error(tmp_path / "spool.sqlite3", "on a read-only filesystem", "read-write")
    monkeypatch.setattr(os, "statvfs", _raises(OSError("no statvfs here")))
    _assert_spool_error(tmp_path / "spool.sqlite3", "cannot be opened for writing", "may write")


def _raises(exc: Exception) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        raise exc

    return fail


def test_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) may write to a read-only directory")
        _assert_spool_error(locked / "spool.sqlite3", "cannot be opened", "may write")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_read_only_spool_is_refused(path: Path) -> None:
    SqliteSpool(path).close()
    path.chmod(stat.S_IRUSR)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("this user (root?) may write to a read-only file")
        _assert_spool_error(path, "cannot be opened for writing", "readonly")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_a_foreign_database_is_refused_untouched(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    error = _assert_spool_error(path, "not an asgi-matomo spool")
    assert error.__cause__ is None
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()


def test_a_spool_of_another_schema_version_is_refused(path: Path) -> None:
    SqliteSpool(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    _assert_spool_error(path, f"schema version {SCHEMA_VERSION + 1}", "move the file away")


@pytest.fixture
def creating(path: Path) -> Iterator[sqlite3.Connection]:
    # Another worker in the middle of creating the spool: it holds the write lock
    # of a new file that is not in WAL mode yet.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    yield other
    other.close()


def test_waits_for_another_worker_creating_the_file(
    path: Path, creating: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []

    def other_worker_finishes(seconds: float) -> None:
        pauses.append(seconds)
        creating.execute("COMMIT")

    monkeypatch.setattr(time, "sleep", other_worker_finishes)
    SqliteSpool(path).close()
    assert pauses == [_spool.WAL_RETRY_SECONDS]


def test_a_file_locked_for_too_long_is_refused(
    path: Path, creating: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spool, "BUSY_TIMEOUT_SECONDS", 0.0)
    error = _assert_spool_error(path, "stayed locked by another process", "sqlite3 shell")
    assert isinstance(error.__cause__, sqlite3.OperationalError)


def test_a_path_without_wal_support_is_refused() -> None:
    with pytest.raises(SpoolError, match=r"spool_path ':memory:' cannot use SQLite's WAL"):
        SqliteSpool(":memory:")


def test_the_database_uses_wal_and_our_ids(spool: SqliteSpool, path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA application_id").fetchone() == (_spool.APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_connection(spool: SqliteSpool) -> None:
    spool.put(make_hits(3))
    parent_claim = spool.claim(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child's coverage is not collected)
        status = 1
        try:
            rows = spool.claim(10)  # the rows the parent has not leased
            spool.put([Hit("from the child", START + 100)])
            spool.ack(ids_of(rows))
            spool.release(ids_of(parent_claim))  # not the child's lease: a no-op
            status = 0 if hits_of(rows) == make_hits(3)[1:] and spool.count() == 2 else 2
            spool.close()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [hit.query for hit in hits_of(spool.claim(10))] == ["from the child"]
    spool.release(ids_of(parent_claim))
    assert hits_of(spool.claim(10)) == make_hits(1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_hooks_close_idle_spools_and_skip_closed_ones(path: Path) -> None:
    idle = SqliteSpool(path)
    closed = SqliteSpool(path)
    closed.close()
    for _ in range(2):  # twice: the second fork finds the connection already closed
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            os._exit(0)
        os.waitpid(pid, 0)
    try:
        idle.put(make_hits(1))
        assert idle.count() == 1
    finally:
        idle.close()


def test_fork_hook_in_child_resets_the_lock_and_the_lease_owner(spool: SqliteSpool) -> None:
    # The child side of the hooks, run in this process: only the child would run it.
    spool.put(make_hits(2))
    held = spool.claim(1)
    _spool._before_fork()
    _spool._after_fork_in_child()
    assert hits_of(spool.claim(10)) == make_hits(2)[1:]
    spool.release(ids_of(held))  # another owner now: nothing to give back
    assert spool.claim(10) == []


@pytest.fixture
def fake_child(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A fork the hooks did not see (a C extension calling fork()): only the pid changes.
    inherited = len(_spool._INHERITED)
    yield
    monkeypatch.undo()
    while len(_spool._INHERITED) > inherited:
        _spool._INHERITED.pop().close()


def test_a_fork_without_hooks_leaves_the_parents_connection_alone(
    path: Path, monkeypatch: pytest.MonkeyPatch, fake_child: None
) -> None:
    spool = SqliteSpool(path)
    spool.put(make_hits(2))
    parents = spool._conn
    monkeypatch.setattr(os, "getpid", lambda: -2)
    assert len(spool.claim(1)) == 1
    assert spool._conn is not parents
    assert parents in _spool._INHERITED
    spool.close()


def test_close_in_a_child_without_hooks_does_not_close_the_parents_connection(
    path: Path, monkeypatch: pytest.MonkeyPatch, fake_child: None
) -> None:
    spool = SqliteSpool(path)
    parents = spool._conn
    monkeypatch.setattr(os, "getpid", lambda: -2)
    spool.close()
    assert parents in _spool._INHERITED


def test_a_fork_without_hooks_after_one_with_hooks(
    path: Path, monkeypatch: pytest.MonkeyPatch, fake_child: None
) -> None:
    spool = SqliteSpool(path)
    _spool._before_fork()
    _spool._after_fork_in_parent()
    monkeypatch.setattr(os, "getpid", lambda: -2)
    assert spool.count() == 0
    spool.close()
    assert spool._conn is None
