"""Delivery of hits to Matomo: bounded queue, bulk batches, retries, spool.

Everything here runs on the application's event loop thread. The request path
only calls `BatchSender.submit`, which appends to a deque; one background task
cuts batches and sends them with Matomo's bulk tracking API. Without a lifespan
there is no place for that task, and `BatchSender.send_now` sends right away.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import random
import time
import urllib.request
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import httpx

from ._bulk import Answer, Kind, bulk_body, read_answer
from ._hit import UNAUTHENTICATED_MAX_AGE, Hit
from ._http import LeanClient, supports
from ._token import TokenPolicy, TokenState, auth_hits
from ._version import __version__

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_HTTP_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_BATCHES",
    "DEFAULT_MAX_QUEUE_SIZE",
    "DEFAULT_RETRY_DEADLINE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatchSender",
    "SpoolProtocol",
    "Stats",
]

DEFAULT_HTTP_TIMEOUT = 5.0
# Matomo has no cap of its own; peers use 20-500 and the log importer 200.
DEFAULT_BATCH_SIZE = 100
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_QUEUE_SIZE = 10_000
DEFAULT_MAX_CONCURRENT_BATCHES = 4
DEFAULT_RETRY_DEADLINE = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_FORK_HOOKS = hasattr(os, "register_at_fork")

# Full-jitter exponential backoff: retry n sleeps uniformly in [0, min(cap, base * 2**(n-1))].
RETRY_BASE = 0.5
RETRY_CAP = 30.0
# Direct mode sends while a request finishes; a few quick attempts, no long backoff.
DIRECT_ATTEMPTS = 3
# A repeated warning (Matomo down, queue full) is logged at most once per this many seconds.
LOG_INTERVAL = 60.0
# Distinct refusal causes remembered for the duplicate filter; beyond this, no more lines.
_MAX_CAUSES = 64
_CLOSE_TIMEOUT = 1.0

_HEADERS = {"Content-Type": "application/json"}
_CLIENT_HEADERS = {"User-Agent": f"asgi-matomo/{__version__}"}

logger = logging.getLogger("asgi_matomo")


class SpoolProtocol(Protocol):
    """Durable storage for hits that could not be delivered (blocking methods).

    `put` may return how many older hits it evicted to stay within its size limit.
    """

    def put(self, hits: Sequence[Hit]) -> int | None: ...
    def claim(self, limit: int) -> list[tuple[int, Hit]]: ...
    def ack(self, ids: Sequence[int]) -> None: ...
    def release(self, ids: Sequence[int]) -> None: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of what the sender did with the hits it was given.

    Every hit given to `submit`/`send_now` ends up in exactly one of `queued`,
    `in_flight`, `sent`, `invalid`, `rejected`, `dropped` or `spooled`. Hits read
    back from the spool are counted again in `sent`/`invalid`/`rejected`/`dropped`
    and, when Matomo tracked them, in `replayed`; hits the spool evicts to stay
    within its size limit are counted in `dropped`.
    """

    submitted: int = 0  # hits handed to submit() or send_now()
    queued: int = 0  # waiting in memory now
    in_flight: int = 0  # in a batch being sent now
    sent: int = 0  # tracked by Matomo (or accepted by a 204/GIF answer)
    retried: int = 0  # HTTP requests repeated after a retryable failure
    invalid: int = 0  # counted invalid by Matomo (bulk answer)
    rejected: int = 0  # refused with a non-retryable HTTP status, or answered by a non-Matomo
    dropped: int = 0  # lost: queue full, deadline passed, closed, too old, spool unwritable or full
    spooled: int = 0  # written to the spool
    replayed: int = 0  # read back from the spool and tracked
    batches: int = 0  # HTTP requests made
    token_rejected: bool = False  # Matomo refused access_token; tracking goes on without it


@dataclass(slots=True)
class _Counters:
    submitted: int = 0
    sent: int = 0
    retried: int = 0
    invalid: int = 0
    rejected: int = 0
    dropped: int = 0
    spooled: int = 0
    replayed: int = 0
    batches: int = 0


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Batch:
    """Hits being delivered; `hits` shrinks to what is still undelivered."""

    __slots__ = ("first_seq", "hits", "tracked", "worker")

    def __init__(self, hits: list[Hit], first_seq: int, *, worker: bool) -> None:
        self.hits = hits
        self.first_seq = first_seq
        self.tracked = 0
        # Batches of the background worker are spooled by aclose() when cancelled;
        # direct-mode batches belong to their request's task.
        self.worker = worker


class _Throttle:
    """Lets one log line per key through every `interval` seconds; counts the rest."""

    def __init__(self, clock: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """The number of lines suppressed since the last one, or None to stay quiet."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter delay before retry number `attempt` (1-based)."""
    ceiling: float = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt - 1, 32))
    return rand() * ceiling


def replay_delay(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the spool is tried again after `failures` replays in a row failed.

    Half fixed, half jitter, so that workers sharing a spool spread their attempts
    and a Matomo that is back is noticed within RETRY_CAP seconds.
    """
    ceiling = min(RETRY_CAP, 2 * RETRY_BASE * 2.0 ** min(failures - 1, 32))
    return ceiling * (0.5 + 0.5 * rand())


def _header(response: object, name: str) -> str | None:
    try:
        headers: Any = getattr(response, "headers", {})
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
    except Exception:  # a duck-typed response: headers is whatever the test double put there
        return None
    return value if isinstance(value, str) else None


def _check_number(name: str, value: object, minimum: float, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum:g}, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class BatchSender:
    """Sends hits to Matomo in bulk requests from a background task.

    Example:
        sender = BatchSender(endpoint="https://matomo.example.com/matomo.php")
        async with sender.running_in_background():
            sender.submit(hit)  # on the request path: O(1), never blocks

    Parameters:
        endpoint: the full URL of matomo.php.
        access_token: a token_auth with write access to the site; needed for `cip`
            and for hits older than 24 h, and sent (in the request body only) with
            the batches that hold such hits. If Matomo rejects it, also after it was
            accepted, the sender notices within a few batches and goes on without it.
        client: an httpx.AsyncClient to send with (never closed here); by default
            the sender creates its own, one per event loop, and closes it: the
            lean HTTP/1.1 client of `_http` on asyncio, httpx where a proxy is
            configured, the URL holds credentials, or the loop is trio.
        http_timeout: seconds one request may take.
        batch_size, flush_interval: a batch leaves when this many hits wait or the
            oldest waited this many seconds.
        max_queue_size: hits waiting in memory; beyond it they go to the spool or
            are dropped.
        max_concurrent_batches: requests in flight at once.
        retry_deadline: seconds a failing batch is retried before it is spooled
            or dropped.
        shutdown_timeout: seconds `aclose()` may spend delivering what is left.
        spool: durable storage for what cannot be delivered (see `SpoolProtocol`);
            closed by `aclose()`.
        clock, wall_clock, sleep: time sources, for tests.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        access_token: str | None = None,
        client: httpx.AsyncClient | None = None,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        spool: SpoolProtocol | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
        if access_token is not None and not isinstance(access_token, str):
            raise TypeError(f"access_token must be a str, got {type(access_token).__name__}")
        _check_number("http_timeout", http_timeout, 0, strict=True)
        _check_int("batch_size", batch_size, 1)
        _check_number("flush_interval", flush_interval, 0, strict=True)
        _check_int("max_queue_size", max_queue_size, 1)
        _check_int("max_concurrent_batches", max_concurrent_batches, 1)
        _check_number("retry_deadline", retry_deadline, 0)
        _check_number("shutdown_timeout", shutdown_timeout, 0)
        self._endpoint = endpoint
        # An empty token (an unset environment variable) means no token.
        self._token = access_token or None
        self._user_client = client
        self._http_timeout = float(http_timeout)
        self._batch_size = batch_size
        self._flush_interval = float(flush_interval)
        self._max_queue_size = max_queue_size
        self._max_concurrent = max_concurrent_batches
        self._retry_deadline = float(retry_deadline)
        self._shutdown_timeout = float(shutdown_timeout)
        self._spool = spool
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._tokens = TokenPolicy(configured=self._token is not None)
        self._throttle = _Throttle(clock)
        self._causes: set[str] = set()
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A weak reference: the hook must not keep a discarded sender alive.
            hook = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: _call(hook))

    def _reset(self) -> None:
        """Fresh per-process state (also what a forked child starts from)."""
        self._state = _State.IDLE
        self._pid = os.getpid()
        self._counters = _Counters()
        # (sequence number, clock() when queued, hit), oldest on the left.
        # (sequence number, clock() when queued, *the hit's fields), oldest on the
        # left. Plain tuples of strings and numbers, not Hit objects: the garbage
        # collector stops tracking such tuples after their first collection, so a
        # backlog of a slow Matomo does not make every full collection longer.
        self._queue: deque[_Entry] = deque()
        self._overflow: list[Hit] = []  # queue full: on its way to the spool
        self._in_flight: dict[int, _Batch] = {}
        self._seq = 0
        self._flush_upto = 0
        self._owned: _OwnedClient | None = None
        self._spool_pending: bool | None = None  # None: not checked yet in this process
        self._replaying = False
        self._spool_puts = 0
        self._shutdown_deadline: float | None = None
        # Backoff sleeps of the worker's batches, cut short when aclose() begins.
        self._backoffs: set[anyio.CancelScope] = set()
        # anyio primitives belong to one event loop: created when the worker starts.
        self._wake: anyio.Event | None = None
        self._overflow_event: anyio.Event | None = None
        self._replay_wanted: anyio.Event | None = None
        self._progress: anyio.Event | None = None
        self._worker_done: anyio.Event | None = None
        self._closed_event: anyio.Event | None = None
        self._slots: anyio.Semaphore | None = None
        self._token_lock: tuple[anyio.lowlevel.EventLoopToken, anyio.Lock] | None = None
        self._scope: anyio.CancelScope | None = None

    def _after_fork_in_child(self) -> None:
        # The parent still owns its queue, worker task and connections; the child
        # must neither send the parent's hits twice nor write into its sockets.
        # The owned client is set aside, never closed nor collected: that would
        # shut down TLS sessions the parent is still using. What was learnt about
        # the token stays.
        if self._owned is not None:
            _INHERITED.append(self._owned)
        self._reset()

    @property
    def running(self) -> bool:
        """True while the background worker accepts hits in this process."""
        # The at-fork hook resets the state in a child, so where it exists the
        # state says it all; this runs twice per request, getpid() is a syscall.
        return self._state is _State.RUNNING and (_FORK_HOOKS or self._pid == os.getpid())

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        c = self._counters
        return Stats(
            submitted=c.submitted,
            queued=len(self._queue) + len(self._overflow),
            in_flight=sum(len(b.hits) for b in self._in_flight.values()),
            sent=c.sent,
            retried=c.retried,
            invalid=c.invalid,
            rejected=c.rejected,
            dropped=c.dropped,
            spooled=c.spooled,
            replayed=c.replayed,
            batches=c.batches,
            token_rejected=self._tokens.rejected,
        )

    # -- request path ---------------------------------------------------------------

    def submit(self, hit: Hit) -> None:
        """Queue one hit for the background worker; never blocks, never raises.

        Call it on the event loop's thread. Counted as dropped when the worker is
        not running (not started yet, or closed).
        """
        self._counters.submitted += 1
        # `self.running`, inlined (once per request): see that property.
        if self._state is not _State.RUNNING or not (_FORK_HOOKS or self._pid == os.getpid()):
            self._drop(1, "not_running", "the sender is not running (closed or not started)")
            return
        queue = self._queue
        if len(queue) >= self._max_queue_size:
            if self._spool is not None and len(self._overflow) < self._max_queue_size:
                self._overflow.append(hit)
                _set(self._overflow_event)
            else:
                self._drop(1, "queue_full", _WHY["queue_full"])
            return
        self._seq += 1
        query, timestamp, cip = hit
        queue.append((self._seq, self._clock(), query, timestamp, cip))
        # Wake the worker only when its plan changes: a first hit starts the
        # interval clock, a full batch is ready now.
        if len(queue) == 1 or len(queue) == self._batch_size:
            _set(self._wake)

    def force_flush(self) -> bool:
        """Ask the worker to send everything queued now, without waiting.

        Returns False when the worker is not running.
        """
        if not self.running:
            return False
        self._flush_upto = self._seq
        _set(self._wake)
        return True

    async def aflush(self, timeout: float | None = None) -> bool:
        """Send everything queued now and wait until it is delivered, spooled or dropped.

        Returns False when `timeout` seconds passed first.
        """
        if not self.force_flush():
            return True
        target = self._seq
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self._oldest_pending() <= target:
                assert self._progress is not None
                await self._progress.wait()
            return True
        return False

    def _oldest_pending(self) -> float:
        oldest = float(self._queue[0][0]) if self._queue else math.inf
        for batch in self._in_flight.values():
            oldest = min(oldest, batch.first_seq)
        return oldest

    def _notify_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = anyio.Event()

    # -- lifecycle --------------------------------------------------------------------

    @asynccontextmanager
    async def running_in_background(self) -> AsyncIterator[None]:
        """Run the background worker for the duration of the block, then `aclose()`.

        Example:
            async with sender.running_in_background():
                ...  # serve requests: sender.submit(hit)
        """
        if self._state is not _State.IDLE:
            raise RuntimeError(
                f"this BatchSender is {self._state.value}; a sender runs once, create a new one"
            )
        async with anyio.create_task_group() as tg:
            await tg.start(self._run)
            try:
                yield
            finally:
                await self.aclose()

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._wake = anyio.Event()
        self._overflow_event = anyio.Event()
        self._replay_wanted = anyio.Event()
        self._progress = anyio.Event()
        self._worker_done = done = anyio.Event()
        self._slots = anyio.Semaphore(self._max_concurrent)
        self._pid = os.getpid()
        self._state = _State.RUNNING
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as tg:
                    task_status.started()
                    if self._spool is not None:
                        tg.start_soon(self._spool_overflow)
                        tg.start_soon(self._replayer)
                    await self._dispatch(tg)
        finally:
            done.set()

    async def _dispatch(self, tg: anyio.abc.TaskGroup) -> None:
        assert self._slots is not None
        while True:
            await self._wait_for_work()
            while self._ready():
                # Waiting for a free slot lets the queue grow into full batches
                # while Matomo is slow.
                await self._slots.acquire()
                tg.start_soon(self._send_batch, self._take_batch())
            if self._state is not _State.RUNNING:
                return

    async def _wait_for_work(self) -> None:
        while not self._ready() and self._state is _State.RUNNING:
            timeout = math.inf
            if self._queue:
                timeout = self._queue[0][1] + self._flush_interval - self._clock()
            self._wake = anyio.Event()
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    def _ready(self) -> bool:
        if not self._queue:
            return False
        first = self._queue[0]
        seq, queued_at = first[0], first[1]
        return (
            len(self._queue) >= self._batch_size
            or self._state is not _State.RUNNING
            or seq <= self._flush_upto
            or self._clock() - queued_at >= self._flush_interval
        )

    def _take_batch(self) -> _Batch:
        n = min(self._batch_size, len(self._queue))
        items = [self._queue.popleft() for _ in range(n)]
        return self._track(_hits_of(items), items[0][0], worker=True)

    async def _spool_overflow(self) -> None:
        # Its own task: the dispatcher may be waiting for a free slot for a long
        # time while Matomo is slow, and that is exactly when the queue overflows.
        while self._state is _State.RUNNING:
            assert self._overflow_event is not None
            await self._overflow_event.wait()
            self._overflow_event = anyio.Event()
            while self._overflow and self._state is _State.RUNNING:
                hits, self._overflow = self._overflow, []
                await self._spool_or_drop(hits, "queue_full")

    async def _replayer(self) -> None:
        # A trigger that arrives while a replay runs sets the event again, so
        # the spool is looked at once more: no "Matomo is back" is ever lost.
        assert self._replay_wanted is not None
        self._replay_wanted.set()  # hits left by a previous process
        failures = 0
        while self._state is _State.RUNNING:
            # Hits still waiting after a replay means Matomo did not take them: try
            # again later, also without traffic (nothing else would notice Matomo is
            # back), backing off up to RETRY_CAP.
            delay = math.inf
            if self._spool_pending:
                failures += 1
                delay = replay_delay(failures)
            else:
                failures = 0
            with anyio.move_on_after(delay):
                await self._replay_wanted.wait()
            self._replay_wanted = anyio.Event()
            await self._replay()

    async def aclose(self) -> None:
        """Stop accepting hits, deliver what is queued within `shutdown_timeout`, spool
        or drop the rest, close the client we created and log a summary. Idempotent.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is _State.CLOSING:
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._closed_event = anyio.Event()
        self._state = _State.CLOSING
        self._shutdown_deadline = self._clock() + self._shutdown_timeout
        # Matomo may be back: batches sleeping off an outage try once more now,
        # within the deadline, instead of holding their slots to the end.
        for backoff in self._backoffs:
            backoff.cancel()
        done = self._worker_done
        try:
            if done is not None:
                _set(self._wake)
                _set(self._overflow_event)
                _set(self._replay_wanted)
                with anyio.move_on_after(self._shutdown_timeout):
                    await done.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if done is not None and not done.is_set():
                    # Past the deadline (or aclose was cancelled): cancel in-flight
                    # batches; their hits stay in _in_flight for the spool.
                    assert self._scope is not None
                    self._scope.cancel()
                    await done.wait()
                await self._finish_close()

    async def _finish_close(self) -> None:
        left = [hit for b in self._in_flight.values() if b.worker for hit in b.hits]
        left += _hits_of(self._queue) + self._overflow
        self._in_flight = {k: b for k, b in self._in_flight.items() if not b.worker}
        self._queue.clear()
        self._overflow = []
        if left:
            await self._spool_or_drop(left, "shutdown")
        if self._spool is not None:
            try:
                await anyio.to_thread.run_sync(self._spool.close)
            except Exception as exc:
                logger.warning("asgi_matomo: closing the spool failed: %r", exc)
        owned, self._owned = self._owned, None
        if owned is not None and owned.loop == anyio.lowlevel.current_token():
            await owned.closer.aclose()  # closes the client
        # A client of another event loop is closed by that loop when it ends.
        self._state = _State.CLOSED
        s = self.stats
        logger.info(
            "asgi_matomo: sender closed: submitted=%d sent=%d invalid=%d rejected=%d "
            "dropped=%d spooled=%d replayed=%d retried=%d batches=%d token_rejected=%s",
            s.submitted,
            s.sent,
            s.invalid,
            s.rejected,
            s.dropped,
            s.spooled,
            s.replayed,
            s.retried,
            s.batches,
            s.token_rejected,
        )
        self._notify_progress()
        assert self._closed_event is not None
        self._closed_event.set()

    # -- direct mode ------------------------------------------------------------------

    async def send_now(self, hits: Sequence[Hit]) -> None:
        """Send hits in one bulk request right away, without the worker. Never raises.

        For servers that never run the ASGI lifespan: a failed request is retried
        a few times within about `http_timeout`, then the hits are spooled or dropped.
        """
        hits = list(hits)
        if not hits:
            return
        self._counters.submitted += len(hits)
        if self._state is _State.CLOSED:
            self._drop(len(hits), "not_running", "the sender is closed")
            return
        self._seq += 1
        batch = self._track(hits, self._seq, worker=False)
        try:
            try:
                left = await self._deliver(batch, span=self._http_timeout, attempts=DIRECT_ATTEMPTS)
            except Exception as exc:
                left = batch.hits
                logger.error("asgi_matomo: sending hits failed unexpectedly: %r", exc)
            if left:
                await self._spool_or_drop(left, "retry_deadline")
        finally:
            # Also when the request's task is cancelled: a stale batch would
            # hold up aflush() forever.
            self._untrack(batch)
            self._notify_progress()
        if not left and self._spool is not None:
            # One spooled batch per request at most: direct mode runs on the
            # request's task, it must not turn into a long replay.
            await self._replay(max_batches=1)

    # -- delivery ---------------------------------------------------------------------

    def _track(self, hits: list[Hit], first_seq: int, *, worker: bool) -> _Batch:
        batch = _Batch(hits, first_seq, worker=worker)
        self._in_flight[id(batch)] = batch
        return batch

    def _untrack(self, batch: _Batch) -> None:
        self._in_flight.pop(id(batch), None)

    async def _send_batch(self, batch: _Batch) -> None:
        assert self._slots is not None
        try:
            left = await self._deliver(batch, span=self._retry_deadline)
        except Exception as exc:  # a bug or a broken user client: never kill the worker
            left = batch.hits
            logger.error("asgi_matomo: sending a batch failed unexpectedly: %r", exc)
        finally:
            # On cancellation (aclose past its deadline) the batch stays in
            # _in_flight, where aclose finds it for the spool.
            self._slots.release()
        if left:
            await self._spool_or_drop(left, "retry_deadline")
        self._untrack(batch)
        self._notify_progress()
        if not left and self._spool_pending:
            # Matomo answers again: time to bring back what was spooled.
            _set(self._replay_wanted)

    def _needs_token(self, hits: list[Hit]) -> bool:
        return self._tokens.needed_by(hits, self._wall_clock())

    async def _deliver(
        self, batch: _Batch, *, span: float, attempts: int | None = None
    ) -> list[Hit]:
        """Deliver `batch.hits`, retrying; returns the hits that could not be delivered."""
        # Until Matomo has confirmed the token, batches that need it go one at a
        # time (in direct mode too: a burst of requests must not send it side by
        # side): a wrong token then costs a couple of failed logins, not dozens,
        # and Matomo blocks the IP after about 20.
        if self._tokens.unproven and self._needs_token(batch.hits):
            async with self._token_lock_here():
                return await self._deliver_unlocked(batch, span, attempts, locked=True)
        return await self._deliver_unlocked(batch, span, attempts, locked=False)

    def _token_lock_here(self) -> anyio.Lock:
        loop = anyio.lowlevel.current_token()
        if self._token_lock is None or self._token_lock[0] != loop:
            self._token_lock = (loop, anyio.Lock())
        return self._token_lock[1]

    async def _deliver_unlocked(
        self, batch: _Batch, span: float, attempts: int | None, *, locked: bool
    ) -> list[Hit]:
        # A batch that finds a confirmed token in doubt takes the token lock for its
        # probe: the batches that would send the token meanwhile wait for the verdict.
        held: list[anyio.Lock] = []
        try:
            return await self._attempts(batch, span, attempts, locked=locked, held=held)
        finally:
            for lock in held:
                lock.release()

    async def _attempts(
        self,
        batch: _Batch,
        span: float,
        attempts: int | None,
        *,
        locked: bool,
        held: list[anyio.Lock],
    ) -> list[Hit]:
        give_up_at = self._clock() + span
        attempt = token_errors = 0
        without_token = probing = False
        while True:
            # Every request with a wrong token is a failed login: it goes only with
            # the batches that need it.
            authenticated = (
                not without_token and self._tokens.in_use and self._needs_token(batch.hits)
            )
            if not authenticated:
                batch.hits = self._drop_too_old(batch.hits)
            hits = batch.hits
            if not hits:
                return []
            sent_as = self._tokens.state if authenticated else TokenState.NONE
            answer = await self._post(hits, authenticated=authenticated)
            if answer.kind is Kind.OK:
                batch.tracked += answer.tracked
                resend = self._settle(hits, answer, sent_as=sent_as, probing=probing)
                if resend is None:
                    batch.hits = []
                    return []
                batch.hits, without_token = resend, True
                if self._tokens.probing(sent_as):
                    probing = True
                    if not locked and not held:
                        lock = self._token_lock_here()
                        await lock.acquire()
                        held.append(lock)
                continue
            if answer.kind is Kind.REFUSED:
                if authenticated and answer.status in (401, 403):
                    self._reject_token(f"HTTP {answer.status}")
                    continue
                if answer.status == 413 and len(hits) > 1:
                    return await self._deliver_halves(
                        batch, give_up_at - self._clock(), locked=locked or bool(held)
                    )
                self._refused(hits, answer)
                batch.hits = []
                return []
            attempt += 1
            if authenticated and (answer.status or 0) >= 500:
                token_errors += 1
                if self._may_probe_lockout(token_errors) and await self._probe_lockout(batch):
                    continue
            delay = answer.retry_after
            if delay is None:
                delay = backoff_delay(attempt)
            # Shutdown may begin while a batch is retrying: it bounds the retries too.
            limit = give_up_at
            if self._shutdown_deadline is not None:
                limit = min(limit, self._shutdown_deadline)
            if (attempts is not None and attempt >= attempts) or self._clock() + delay > limit:
                self._warn(
                    "gave_up",
                    "asgi_matomo: Matomo unavailable (%s): giving up on a batch",
                    answer.cause,
                )
                return hits
            self._warn("retry", "asgi_matomo: Matomo unavailable (%s): retrying", answer.cause)
            self._counters.retried += 1
            await self._backoff(delay, wake_on_close=batch.worker)

    async def _backoff(self, delay: float, *, wake_on_close: bool) -> None:
        """Sleep before a retry; a worker batch's sleep ends when aclose() begins."""
        # Once closing, the delay fits in the shutdown deadline: no need to wake it.
        if not wake_on_close or self._state is not _State.RUNNING:
            await self._sleep(delay)
            return
        with anyio.CancelScope() as scope:
            self._backoffs.add(scope)
            try:
                await self._sleep(delay)
            finally:
                self._backoffs.discard(scope)

    def _may_probe_lockout(self, token_errors: int) -> bool:
        """Whether a batch that got `token_errors` 5xx answers with the token tries without."""
        return self._tokens.may_probe_lockout(token_errors, self._clock)

    async def _deliver_halves(self, batch: _Batch, span: float, *, locked: bool) -> list[Hit]:
        """Send a batch too large for the web server in front of Matomo as two."""
        self._log_once(
            "413",
            logging.WARNING,
            "asgi_matomo: a batch of %d hits was too large for the server (HTTP 413); "
            "sending smaller ones. Lower batch_size or raise the server's body size limit.",
            len(batch.hits),
        )
        left: list[Hit] = []
        mid = len(batch.hits) // 2
        for part in (batch.hits[:mid], batch.hits[mid:]):
            half = _Batch(part, batch.first_seq, worker=batch.worker)
            left += await self._deliver_unlocked(half, max(span, 0.0), None, locked=locked)
            batch.tracked += half.tracked
        batch.hits = left
        return left

    async def _probe_lockout(self, batch: _Batch) -> bool:
        """True when Matomo takes without the token what it answered 5xx to with it.

        Matomo answers HTTP 500 to every authenticated bulk request from an IP it
        blocked after about 20 failed logins (a wrong token, maybe sent by other
        processes or earlier runs): "down" and "locked out" look the same until a
        request without the token tells them apart.
        """
        now = self._wall_clock()
        fresh = [h for h in batch.hits if not h.too_old(now, authenticated=False)]
        if not fresh:
            return False
        answer = await self._post(fresh, authenticated=False)
        if answer.kind is not Kind.OK:
            return False
        self._reject_token(
            "HTTP 5xx with it, accepted without it: a wrong token, or this server's IP "
            "is blocked after failed logins"
        )
        batch.tracked += answer.tracked
        self._settle(fresh, answer, sent_as=TokenState.NONE, probing=False)
        sent = {id(h) for h in fresh}
        batch.hits = [h for h in batch.hits if id(h) not in sent]
        return True

    def _settle(
        self, hits: list[Hit], answer: Answer, *, sent_as: TokenState, probing: bool
    ) -> list[Hit] | None:
        """Count a 2xx answer; returns the hits to resend without the token, if any.

        `sent_as` is the token's state when the batch was sent with it,
        `TokenState.NONE` when it was sent without.
        """
        self._counters.sent += answer.tracked
        carrying = auth_hits(hits)
        if self._tokens.doubts(sent_as, len(carrying), answer.invalid):
            return carrying
        self._counters.invalid += answer.invalid
        if probing:
            self._conclude_probe(answer, len(hits))
        if answer.invalid:
            self._warn(
                "invalid",
                "asgi_matomo: Matomo counted %d of %d hits invalid (wrong idsite? bad parameter?)",
                answer.invalid,
                len(hits),
            )
        return None

    def _conclude_probe(self, answer: Answer, n: int) -> None:
        if answer.tracked == n:
            self._reject_token("hits with cip were invalid with it, tracked without it")
        elif answer.tracked == 0:
            self._log_once(
                "idsite",
                logging.ERROR,
                "asgi_matomo: Matomo refused every hit of a batch, with and without the "
                "access_token: the site id (idsite) is probably wrong or the site does not "
                "exist in this Matomo. Check idsite and the Matomo URL.",
            )

    def _reject_token(self, why: str) -> None:
        self._tokens.reject()
        self._log_once(
            "token",
            logging.ERROR,
            "asgi_matomo: Matomo rejected the access_token (%s). Tracking continues "
            "without it: visitor IPs (cip) are not sent and hits older than 24 h are "
            "dropped. Fix: use the token_auth of a Matomo user with write access to the "
            "site (Administration > Personal > Security > Auth tokens).",
            why,
        )

    def _refused(self, hits: list[Hit], answer: Answer) -> None:
        self._counters.rejected += len(hits)
        body = answer.cause
        if self._token:
            body = body.replace(self._token, "***")
        if answer.foreign:
            self._log_once(
                f"foreign:{body}",
                logging.ERROR,
                "asgi_matomo: the Matomo URL does not look like Matomo's tracking endpoint "
                "(matomo.php): a batch of %d hits was answered %s. Nothing was recorded; "
                "the hits are counted as rejected, not retried. Check matomo_url "
                "(logged once per distinct answer).",
                len(hits),
                body,
            )
            return
        self._log_once(
            f"{answer.status}:{body}",
            logging.ERROR,
            "asgi_matomo: Matomo refused a batch of %d hits with HTTP %s: %s "
            "(not retried; logged once per distinct answer)",
            len(hits),
            answer.status,
            body,
        )

    def _drop_too_old(self, hits: list[Hit]) -> list[Hit]:
        now = self._wall_clock()
        # Hit.too_old(now, authenticated=False), inlined: this runs for every hit sent.
        keep = [h for h in hits if now - h.timestamp < UNAUTHENTICATED_MAX_AGE]
        if len(keep) != len(hits):
            self._drop(len(hits) - len(keep), "too_old", _WHY["too_old"])
        return keep

    async def _post(self, hits: list[Hit], *, authenticated: bool) -> Answer:
        content = bulk_body(
            [h.encode(authenticated=authenticated) for h in hits],
            self._token if authenticated else None,
        )
        self._counters.batches += 1
        try:
            client = await self._client()
            response: Any
            if isinstance(client, LeanClient):
                # Its own timer on the loop: cheaper than a cancel scope per POST.
                response = await client.post(
                    self._endpoint, content=content, headers=_HEADERS, timeout=self._http_timeout
                )
            else:
                # Caps the whole exchange: httpx's own timeout is per operation.
                with anyio.fail_after(self._http_timeout):
                    response = await client.post(self._endpoint, content=content, headers=_HEADERS)
        except TimeoutError:
            return Answer(Kind.RETRY, cause="timeout")
        except Exception as exc:  # connection errors, and whatever a user's client raises
            return Answer(Kind.RETRY, cause=type(exc).__name__)
        status = getattr(response, "status_code", None)
        logger.debug("asgi_matomo: bulk request of %d hits answered %s", len(hits), status)
        if not isinstance(status, int) or isinstance(status, bool):
            # A test double, most likely: nothing more of it is read.
            return Answer(Kind.REFUSED, cause="an answer without a status code")
        text = getattr(response, "text", "")
        return read_answer(
            status,
            text if isinstance(text, str) else "",
            len(hits),
            # Headers and the clock are read only by the answers that need them.
            header=lambda name: _header(response, name),
            now=self._wall_clock,
            excerpt=self._excerpt,
        )

    def _excerpt(self, text: str, limit: int) -> str:
        """The start of an answer for a log line: one line, the token masked (before cutting)."""
        text = " ".join(text.split())
        if self._token:
            text = text.replace(self._token, "***")
        return text[:limit]

    async def _client(self) -> _Client:
        if self._user_client is not None:
            return self._user_client
        # Connections belong to the event loop that opened them, and Starlette's
        # TestClient runs every request in a new loop: one client per loop.
        loop = anyio.lowlevel.current_token()
        if self._owned is not None and self._owned.loop == loop:
            return self._owned.client
        # Matomo falls back to the sender's User-Agent for a hit without `ua` (a
        # visitor that sent none): name this library rather than python-httpx.
        client: _Client
        if _lean_fits(self._endpoint, loop):
            # A tenth of httpx's CPU per request; httpx for what it does not cover.
            client = LeanClient(
                self._endpoint, headers=_CLIENT_HEADERS, max_idle=self._max_concurrent
            )
        else:
            client = httpx.AsyncClient(timeout=self._http_timeout, headers=_CLIENT_HEADERS)
        closer = _close_when_loop_ends(client)
        # The previous client, if any, is left to its own loop's closer.
        self._owned = _OwnedClient(loop, client, closer)
        await closer.__anext__()
        return client

    # -- spool ------------------------------------------------------------------------

    async def _spool_or_drop(self, hits: list[Hit], reason: str) -> None:
        if self._spool is not None:
            try:
                evicted = await anyio.to_thread.run_sync(self._spool.put, hits)
            except Exception as exc:
                self._warn("spool_put", "asgi_matomo: writing to the spool failed: %r", exc)
            else:
                self._counters.spooled += len(hits)
                self._spool_pending = True
                self._spool_puts += 1
                if evicted:
                    self._drop(evicted, "spool_full", _WHY["spool_full"])
                return
        self._drop(len(hits), reason, _WHY[reason])

    async def _replay(self, max_batches: int | None = None) -> None:
        """Send spooled hits, oldest first, while Matomo accepts them."""
        spool = self._spool
        if spool is None or self._replaying:
            return
        self._replaying = True
        try:
            if self._spool_pending is None:
                waiting = await anyio.to_thread.run_sync(spool.count)
                # A put while count() ran already knows better.
                if self._spool_pending is None:
                    self._spool_pending = waiting > 0
            done = 0
            while self._spool_pending and (max_batches is None or done < max_batches):
                # The worker stops replaying at shutdown: the spool keeps the rest.
                if max_batches is None and self._state is not _State.RUNNING:
                    return
                if not await self._replay_batch(spool):
                    return
                done += 1
        except Exception as exc:
            self._warn("spool_read", "asgi_matomo: reading the spool failed: %r", exc)
        finally:
            self._replaying = False

    async def _replay_batch(self, spool: SpoolProtocol) -> bool:
        """Claim, send and ack one batch; False when the spool is empty or Matomo failed."""
        slots = self._slots if self._state is _State.RUNNING else None
        if slots is not None:
            await slots.acquire()
        try:
            puts = self._spool_puts
            claimed = await anyio.to_thread.run_sync(spool.claim, self._batch_size)
            if not claimed:
                # Unless hits were put while claim() ran, the spool is empty.
                self._spool_pending = puts != self._spool_puts
                return False
            ids = {id(hit): sid for sid, hit in claimed}
            batch = _Batch([hit for _, hit in claimed], 0, worker=False)
            try:
                left = await self._deliver(batch, span=0.0, attempts=1)
            except BaseException:
                # Cancelled (or a bug): give the lease back so the hits are not
                # stuck until it expires.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(spool.release, list(ids.values()))
                raise
            left_ids = {ids[id(hit)] for hit in left}
            done_ids = [sid for sid in ids.values() if sid not in left_ids]
            if done_ids:
                await anyio.to_thread.run_sync(spool.ack, done_ids)
            self._counters.replayed += batch.tracked
            if left_ids:
                await anyio.to_thread.run_sync(spool.release, sorted(left_ids))
                return False
            return True
        finally:
            if slots is not None:
                slots.release()

    # -- accounting and logging -------------------------------------------------------

    def _drop(self, n: int, key: str, why: str) -> None:
        self._counters.dropped += n
        self._warn(f"drop:{key}", "asgi_matomo: dropped %d hits: %s", n, why)

    def _warn(self, key: str, message: str, *args: object) -> None:
        suppressed = self._throttle.allow(key)
        if suppressed is None:
            return
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        logger.warning(message, *args)

    def _log_once(self, key: str, level: int, message: str, *args: object) -> None:
        if key in self._causes or len(self._causes) >= _MAX_CAUSES:
            return
        self._causes.add(key)
        logger.log(level, message, *args)


_WHY = {
    "queue_full": "the queue is full (Matomo too slow or down)",
    "retry_deadline": "Matomo did not accept them before the retry deadline",
    "shutdown": "they were still undelivered at shutdown",
    "spool_full": "the spool is full: it evicted its oldest hits",
    "too_old": "hits older than 24 h cannot be tracked without a valid access_token",
}


_Entry = tuple[int, float, str, float, str | None]


def _hits_of(entries: Iterable[_Entry]) -> list[Hit]:
    return [Hit(query, timestamp, cip) for _, _, query, timestamp, cip in entries]


def _set(event: anyio.Event | None) -> None:
    if event is not None:
        event.set()


def _call(hook: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = hook()
    if method is not None:
        method()


def _lean_fits(endpoint: str, loop: anyio.lowlevel.EventLoopToken) -> bool:
    """Whether the lean client sends to `endpoint` exactly as httpx would, in this loop."""
    # asyncio only (anyio's token of an asyncio loop is the loop itself).
    if not isinstance(loop.native_token, asyncio.AbstractEventLoop):
        return False
    # httpx goes through the proxies that urllib finds (environment variables,
    # and the system's settings on macOS and Windows); the lean client does not.
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return False
    return supports(endpoint)


_Client = httpx.AsyncClient | LeanClient


@dataclass(frozen=True, slots=True)
class _OwnedClient:
    loop: anyio.lowlevel.EventLoopToken
    client: _Client
    closer: AsyncGenerator[None, None]


# Clients inherited through a fork: the child must never close (nor let the
# garbage collector finalize) connections that belong to its parent.
_INHERITED: list[_OwnedClient] = []


async def _close_when_loop_ends(client: _Client) -> AsyncGenerator[None, None]:
    """Closes `client` inside its event loop when that loop finishes.

    In direct mode nothing tells us when a loop ends (TestClient runs each
    request in its own), and a client cannot be closed from another loop: its
    keep-alive sockets would leak. A suspended async generator is finalized by
    the loop itself on the way out (asyncio's shutdown_asyncgens, trio's
    end-of-run finalizer), while the loop can still close sockets.
    """
    try:
        yield
    finally:
        try:
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await client.aclose()
        except Exception as exc:
            logger.debug("asgi_matomo: closing the HTTP client failed: %r", exc)
