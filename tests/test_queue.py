"""The sender's queue: when a batch is due, and what it holds (no I/O)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from asgi_matomo._hit import Hit
from asgi_matomo._queue import HitQueue
from tests.helpers import FakeClock


def hit(n: int) -> Hit:
    return Hit(f"idsite=1&rec=1&n={n}", 1_700_000_000.0 + n, "10.0.0.1" if n % 2 else None)


def queue(clock: FakeClock, batch_size: int = 3) -> HitQueue:
    limits = SimpleNamespace(batch=batch_size)
    return HitQueue(max_size=10, limits=limits, flush_interval=1.0, clock=clock)


def test_a_batch_is_due_when_full() -> None:
    q = queue(FakeClock(100.0))
    assert not q.ready(closing=False)
    # The worker is woken for the first hit (the interval starts) and a full batch.
    assert [q.append(hit(n)) for n in range(4)] == [True, False, True, False]
    assert q.ready(closing=False)
    assert q.take() == ([hit(0), hit(1), hit(2)], 1)
    assert len(q) == 1


def test_a_batch_is_due_after_the_interval() -> None:
    clock = FakeClock(100.0)
    q = queue(clock)
    assert q.wait() == math.inf
    q.append(hit(0))
    clock.now += 0.25
    assert q.wait() == 0.75
    assert not q.ready(closing=False)
    clock.now += 0.75
    assert q.ready(closing=False)


def test_flush_and_shutdown_make_everything_due() -> None:
    q = queue(FakeClock(100.0))
    q.append(hit(0))
    assert q.ready(closing=True)
    assert not q.ready(closing=False)
    assert q.flush() == 1
    q.append(hit(1))
    assert q.ready(closing=False)
    assert q.take() == ([hit(0), hit(1)], 1)
    # A hit queued after the flush waits for its batch or its interval again.
    q.append(hit(2))
    assert not q.ready(closing=False)
    assert q.oldest() == 3


def test_drain_takes_the_queue_and_the_overflow() -> None:
    q = queue(FakeClock(100.0))
    q.append(hit(0))
    q.overflow.append(hit(1))
    assert len(q) == 2
    assert q.drain() == [hit(0), hit(1)]
    assert len(q) == 0
    assert q.oldest() == math.inf
