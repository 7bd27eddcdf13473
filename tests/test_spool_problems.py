"""A spool file that cannot be used never stops the app: real uvicorn, real files.

Full disk and read-only directory use a small tmpfs mounted by the test (root
only; skipped with the reason where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_matomo._collector import Collector
from asgi_matomo._spool import SqliteSpool
from tests.servers import Server, serve
from tests.test_delivery import APP, WAIT, load, numbers, stats, wait_until

pytestmark = pytest.mark.slow

GARBAGE = b"this is not a database " * 500
# The first ERROR of a problem, at start-up or later: nothing else the spool logs
# at start reaches the server's log (WARNING and above).
SPOOL_LINE = "asgi_matomo: spool_path "


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(sites=[1]) as running:
        yield running


def options(spool_path: Path) -> dict[str, Any]:
    return {
        "spool_path": str(spool_path),
        "flush_interval": 0.1,
        "retry_deadline": 0.5,
        "shutdown_timeout": 1.0,
    }


def spool_lines(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if SPOOL_LINE in line]


def spooled_rows(path: Path) -> int:
    with contextlib.closing(SqliteSpool(path)) as spool:
        return spool.count()


class Tmpfs:
    """A small filesystem of its own, to fill up or make read-only."""

    def __init__(self, mountpoint: Path) -> None:
        self.path = mountpoint

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def fill(self) -> None:
        """Take every free byte (down to SQLite's smallest write)."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 1 << 12, 1 << 9, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        (self.path / "filler").unlink()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield Tmpfs(mountpoint)
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_disk_at_start_then_freed(collector: Collector, tmp_path: Path, tmpfs: Tmpfs) -> None:
    spool_path = tmpfs.path / "spool.sqlite3"
    tmpfs.fill()
    collector.stop()
    with serve(APP, collector.tracking_url, tmp_path, options=options(spool_path)) as server:
        load(server, range(100))  # every response 200, the app's own
        wait_until(lambda: stats(server)["dropped"] > 0, "hits dropped: no spool, no Matomo")
        assert stats(server)["spooled"] == 0
        [line] = spool_lines(server)
        assert "cannot be written: the disk is full" in line
        assert "free some space" in line
        # The disk frees up: the spool is used again, without a restart.
        tmpfs.free()

        def spooled_after_freeing() -> bool:
            load(server, range(1000, 1010))
            return int(stats(server)["spooled"]) > 0

        wait_until(spooled_after_freeing, "hits reaching the spool once space is free")
        collector.start()
        load(server, range(2000, 2010))
        wait_until(lambda: stats(server)["replayed"] > 0, "spooled hits sent once Matomo is back")
        assert len(spool_lines(server)) == 1
    assert "Application shutdown complete" in server.log()


def test_disk_filling_up_while_running(collector: Collector, tmp_path: Path, tmpfs: Tmpfs) -> None:
    spool_path = tmpfs.path / "spool.sqlite3"
    collector.stop()
    with serve(APP, collector.tracking_url, tmp_path, options=options(spool_path)) as server:
        load(server, range(50))
        wait_until(lambda: stats(server)["spooled"] > 0, "hits reaching the spool")
        assert spool_lines(server) == []
        tmpfs.fill()
        dropped = int(stats(server)["dropped"])

        def dropped_now() -> bool:
            load(server, range(100, 120))
            return int(stats(server)["dropped"]) > dropped

        wait_until(dropped_now, "hits dropped once the disk is full")
        [line] = spool_lines(server)
        assert "the disk is full" in line
        collector.start()
        load(server, range(200, 220))
        collector.wait_for_hits(20, timeout=WAIT)
    assert "Application shutdown complete" in server.log()


def test_read_only_directory_at_start_then_writable(
    collector: Collector, tmp_path: Path, tmpfs: Tmpfs
) -> None:
    spool_path = tmpfs.path / "spool.sqlite3"
    tmpfs.remount("ro")
    with serve(APP, collector.tracking_url, tmp_path, options=options(spool_path)) as server:
        load(server, range(100))
        hits = collector.wait_for_hits(100, timeout=WAIT)  # tracking goes on in memory
        assert numbers(hits) == Counter(range(100))
        [line] = spool_lines(server)
        assert "cannot be written (unable to open database file)" in line
        assert "it is on a read-only filesystem: mount it read-write" in line
        assert not spool_path.exists()
        tmpfs.remount("rw")
        collector.stop()

        def spooled() -> bool:
            load(server, range(1000, 1010))
            return int(stats(server)["spooled"]) > 0

        wait_until(spooled, "hits reaching the spool once the directory is writable")
        assert len(spool_lines(server)) == 1
    assert spooled_rows(spool_path) > 0


def test_a_garbage_spool_file_is_moved_aside_and_a_new_spool_made(
    collector: Collector, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool.sqlite3"
    spool_path.write_bytes(GARBAGE)
    collector.stop()
    with serve(APP, collector.tracking_url, tmp_path, options=options(spool_path)) as server:
        load(server, range(100))
        wait_until(lambda: stats(server)["spooled"] > 0, "hits reaching the new spool")
        [line] = spool_lines(server)
        assert "is corrupt (file is not a database): moved it aside to" in line
        [aside] = tmp_path.glob("spool.sqlite3.corrupt-*")
        assert aside.read_bytes() == GARBAGE
        assert f"{str(aside)!r}" in line
        collector.start()
        load(server, range(100, 110))
        hits = collector.wait_for_hits(110, timeout=WAIT)
    # Every hit: the ones spooled, the ones still in memory, and the later ones.
    assert numbers(hits) == Counter(range(110))
    assert spooled_rows(spool_path) == 0


def test_a_foreign_sqlite_file_is_left_alone_and_tracking_goes_on_in_memory(
    collector: Collector, tmp_path: Path
) -> None:
    spool_path = tmp_path / "app.sqlite3"
    conn = sqlite3.connect(spool_path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('alice')")
    conn.commit()
    conn.close()
    before = spool_path.read_bytes()
    with serve(APP, collector.tracking_url, tmp_path, options=options(spool_path)) as server:
        load(server, range(100))
        hits = collector.wait_for_hits(100, timeout=WAIT)
        [line] = spool_lines(server)
        assert "is a SQLite database that is not an asgi-matomo spool" in line
    assert numbers(hits) == Counter(range(100))
    # Not ours: not renamed, not changed (not even switched to WAL).
    assert spool_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app")) == ["app.sqlite3"]
    with contextlib.closing(sqlite3.connect(spool_path)) as conn:
        assert conn.execute("SELECT name FROM users").fetchall() == [("alice",)]
