"""Spool replay: hits leased by a process that died come back without a restart."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from asgi_matomo._collector import Collector
from asgi_matomo._hit import Hit
from asgi_matomo._replay import DEFAULT_LEASE_SECONDS, MIN_LOOK_INTERVAL, look_interval
from asgi_matomo._retry import RETRY_AFTER_JITTER, RETRY_CAP
from asgi_matomo._sender import BatchSender
from asgi_matomo._spool import SqliteSpool

LEASE = 1.0  # seconds: short, so the test waits for a lease to expire quickly
HITS = 100
WAIT = 30.0


@pytest.mark.parametrize(
    ("lease", "interval"),
    [
        (60.0, 30.0),
        (10, 5.0),
        (3600.0, RETRY_CAP),
        (0.001, MIN_LOOK_INTERVAL),
        (None, DEFAULT_LEASE_SECONDS / 2),
        ("60", DEFAULT_LEASE_SECONDS / 2),
        (True, DEFAULT_LEASE_SECONDS / 2),
        (-1.0, DEFAULT_LEASE_SECONDS / 2),
        (math.nan, DEFAULT_LEASE_SECONDS / 2),
    ],
)
def test_an_empty_looking_spool_is_looked_at_every_half_lease(
    lease: object, interval: float
) -> None:
    assert look_interval(lease) == interval


# Runs in a subprocess: spools HITS hits, claims them as a replaying sender
# would (leased for the default 60 s), says so, and waits to be killed
# (SIGKILL: no release, no ack).
_DYING_REPLAYER = """
import sys, time
from asgi_matomo._hit import Hit
from asgi_matomo._spool import SqliteSpool

spool = SqliteSpool(sys.argv[1])
now = time.time()
spool.put([Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now) for i in range({n})])
print(len(spool.claim({n})), flush=True)
time.sleep(3600)
"""


class LeaseClock:
    """The running process's clock for leases: real time, until the test moves it on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.sleep(0.01)  # polling a condition with a deadline


@pytest.mark.slow
def test_leases_of_a_killed_process_are_delivered_by_a_running_one(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite3")
    script = textwrap.dedent(_DYING_REPLAYER).replace("{n}", str(HITS))
    dying = subprocess.Popen(
        [sys.executable, "-c", script, path],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert dying.stdout is not None
        assert dying.stdout.readline().strip() == str(HITS).encode()  # all leased
    finally:
        dying.send_signal(signal.SIGKILL)
        dying.wait()
        if dying.stdout is not None:
            dying.stdout.close()

    with Collector(sites=[1]) as collector:

        async def main() -> None:
            clock = LeaseClock()
            # A short lease of its own: this process looks at the spool every 0.5 s.
            spool = SqliteSpool(path, lease_seconds=LEASE, clock=clock)
            sender = BatchSender(endpoint=collector.tracking_url, spool=spool)
            async with sender.running_in_background():
                # Its first look: hits in the spool, none claimable (leased).
                await until(lambda: sender._spooler.pending is False)
                assert collector.requests == []
                clock.ahead = 3600.0  # the dead process's lease expires
                await anyio.to_thread.run_sync(collector.wait_for_hits, HITS, WAIT)
            assert sender.stats.replayed == HITS
            assert sender.stats.spooled == 0  # nothing of its own in the spool

        anyio.run(main)
        counted = Counter(hit.url for hit in collector.hits())
    assert len(counted) == HITS
    assert set(counted.values()) == {1}  # each exactly once
    assert SqliteSpool(path).count() == 0


class MovableClock:
    """The sender's monotonic clock: real time, until the test moves it on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


RETRY_AFTER = 60.0  # seconds: far longer than the window the test watches
WINDOW = 2.0  # seconds: the replay's own first backoff (at most 1 s) fits twice


@pytest.mark.slow
def test_a_replay_answered_503_with_retry_after_waits_as_asked(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite3")
    now = time.time()
    spooled = [Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2Fs{i}", now) for i in range(5)]
    SqliteSpool(path).put(spooled)

    with Collector(sites=[1]) as collector:
        # The first request, the replay of what the spool holds, is told to come back later.
        collector.set_fault(status=503, headers={"Retry-After": str(int(RETRY_AFTER))}, count=1)

        async def main() -> None:
            clock = MovableClock()
            sender = BatchSender(
                endpoint=collector.tracking_url, spool=SqliteSpool(path), clock=clock
            )
            async with sender.running_in_background():
                await anyio.to_thread.run_sync(collector.wait_for_requests, 1, WAIT)
                # Matomo takes live hits meanwhile (which would otherwise start a replay
                # at once), and the replayer's own backoff (0.5 to 1 s) passes, twice:
                # the window is what is measured.
                sender.submit(Hit("idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2Flive", now))
                assert await sender.aflush(WAIT)
                await anyio.sleep(WINDOW)
                assert [r.status for r in collector.requests] == [503, 200]
                assert sender.stats.replayed == 0
                # Once the time asked for has passed, the next sign of Matomo (a live
                # batch taken) brings the spool back.
                clock.ahead = RETRY_AFTER * (1 + RETRY_AFTER_JITTER)
                sender.submit(Hit("idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2Flive2", now))
                assert await sender.aflush(WAIT)
                await anyio.to_thread.run_sync(collector.wait_for_hits, 7, WAIT)
            assert sender.stats.replayed == 5

        anyio.run(main)
        urls = Counter(hit.url for hit in collector.hits())
    assert set(urls.values()) == {1}
    assert len(urls) == 7
    assert SqliteSpool(path).count() == 0
