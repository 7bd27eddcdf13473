"""Delivery of hits to Matomo: the sender that the middleware talks to.

Everything here runs on the application's event loop thread. The request path
only calls `BatchSender.submit`, which appends to a bounded queue (`_queue`);
one background task cuts batches and sends each in its own task, as many and
as large as `_adaptive` finds Matomo takes, within `max_concurrent_batches` and
`batch_size`. Each batch is delivered by `_delivery` (retries, the token, 413
splits) over `_transport`; what cannot be delivered goes to the spool and comes
back from it through `_replay`.

Without a lifespan, the requests' own tasks send their hits: see `_direct`.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel
import httpx

from ._adaptive import Controller
from ._delivery import Batch, Delivery, Slots
from ._direct import DirectSender
from ._hit import Hit
from ._queue import HitQueue
from ._replay import Spooler, SpoolProtocol
from ._report import WHY, Counters, Reporter, Stats
from ._token import TokenPolicy
from ._transport import Transport

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
DEFAULT_BATCH_SIZE = 1000
DEFAULT_FLUSH_INTERVAL = 1.0
# The sender's limits grow over about three answer times (see _adaptive); what
# arrives meanwhile waits here. Two and a half times the most the default limits
# put in flight (16 x 1,000) holds that ramp for an app producing as many hits per
# answer time as those limits carry. About 750 bytes a hit: 30 MB when full.
DEFAULT_MAX_QUEUE_SIZE = 40_000
DEFAULT_MAX_CONCURRENT_BATCHES = 16
DEFAULT_RETRY_DEADLINE = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_FORK_HOOKS = hasattr(os, "register_at_fork")

logger = logging.getLogger("asgi_matomo")


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


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
        batch_size: the most hits in one batch; the sender adapts the size below it
            (see `_adaptive`).
        flush_interval: a batch leaves when a batch's worth of hits waits or the
            oldest waited this many seconds.
        max_queue_size: hits waiting in memory; beyond it they go to the spool or
            are dropped.
        max_concurrent_batches: the most requests in flight at once; the sender
            adapts the number below it.
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
        # An empty token (an unset environment variable) means no token.
        self._token = access_token or None
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
        self._reporter = Reporter(clock)
        self._transport = Transport(
            endpoint,
            token=self._token,
            client=client,
            http_timeout=self._http_timeout,
            max_idle=max_concurrent_batches,
            wall_clock=wall_clock,
        )
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A weak reference: the hook must not keep a discarded sender alive.
            hook = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: _call(hook))

    def _reset(self) -> None:
        """Fresh per-process state (also what a forked child starts from)."""
        self._state = _State.IDLE
        self._pid = os.getpid()
        self._reporter.counters = Counters()
        # How many batches in flight, how large: adapted to Matomo's answers.
        self._controller = Controller(
            max_concurrency=self._max_concurrent,
            max_batch=self._batch_size,
            http_timeout=self._http_timeout,
        )
        self._queue = HitQueue(
            max_size=self._max_queue_size,
            limits=self._controller,
            flush_interval=self._flush_interval,
            clock=self._clock,
        )
        self._in_flight: dict[int, Batch] = {}
        self._next_send = -math.inf  # when the worker may send the next batch (_pace)
        self._delivery = Delivery(
            transport=self._transport,
            controller=self._controller,
            tokens=self._tokens,
            token=self._token,
            reporter=self._reporter,
            clock=self._clock,
            wall_clock=self._wall_clock,
            sleep=self._sleep,
        )
        self._spooler = Spooler(
            self._spool,
            reporter=self._reporter,
            deliver=self._deliver_replayed,
            limits=self._controller,
            clock=self._clock,
        )
        self._direct = DirectSender(
            queue=self._queue,
            controller=self._controller,
            delivery=self._delivery,
            spooler=self._spooler,
            reporter=self._reporter,
            in_flight=self._in_flight,
            progress=self._notify_progress,
            idle=lambda: self._state is _State.IDLE,
            closed=lambda: self._state is _State.CLOSED,
            http_timeout=self._http_timeout,
            clock=self._clock,
        )
        # anyio primitives belong to one event loop: created when the worker starts.
        self._wake: anyio.Event | None = None
        self._progress: anyio.Event | None = None
        self._worker_done: anyio.Event | None = None
        self._closed_event: anyio.Event | None = None
        self._slots: Slots | None = None
        self._scope: anyio.CancelScope | None = None

    def _after_fork_in_child(self) -> None:
        # The parent still owns its queue, worker task and connections; the child
        # must neither send the parent's hits twice nor write into its sockets.
        # What was learnt about the token stays.
        self._transport.forget()
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
        c = self._reporter.counters
        return Stats(
            submitted=c.submitted,
            queued=len(self._queue),
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
            concurrency=self._controller.concurrency,
            batch_size=self._controller.batch,
        )

    # -- request path ---------------------------------------------------------------

    def submit(self, hit: Hit) -> None:
        """Queue one hit for the background worker; never blocks, never raises.

        Call it on the event loop's thread. Counted as dropped when the worker is
        not running (not started yet, or closed).
        """
        self._reporter.counters.submitted += 1
        # `self.running`, inlined (once per request): see that property.
        if self._state is not _State.RUNNING or not (_FORK_HOOKS or self._pid == os.getpid()):
            self._reporter.drop(
                1, "not_running", "the sender is not running (closed or not started)"
            )
            return
        queue = self._queue
        if len(queue.entries) >= queue.max_size:
            if self._spool is not None and len(queue.overflow) < queue.max_size:
                queue.overflow.append(hit)
                _set(self._spooler.overflowed)
            else:
                self._reporter.drop(1, "queue_full", WHY["queue_full"])
            return
        if queue.append(hit):
            _set(self._wake)

    async def send_now(self, hits: Sequence[Hit]) -> None:
        """Send hits right away, without the worker (no lifespan); never raises: see `_direct`."""
        await self._direct.send_now(hits)

    def force_flush(self) -> bool:
        """Ask the worker to send everything queued now, without waiting.

        Returns False when the worker is not running.
        """
        if not self.running:
            return False
        self._queue.flush()
        _set(self._wake)
        return True

    async def aflush(self, timeout: float | None = None) -> bool:
        """Send everything queued now and wait until it is delivered, spooled or dropped.

        Returns False when `timeout` seconds passed first.
        """
        if not self.force_flush():
            return True
        target = self._queue.seq
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self._oldest_pending() <= target:
                assert self._progress is not None
                await self._progress.wait()
            return True
        return False

    def _oldest_pending(self) -> float:
        oldest = self._queue.oldest()
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
        self._progress = anyio.Event()
        self._worker_done = done = anyio.Event()
        self._slots = Slots(self._controller)
        self._spooler.start(self._slots)
        self._pid = os.getpid()
        self._state = _State.RUNNING
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as tg:
                    task_status.started()
                    if self._spool is not None:
                        tg.start_soon(self._spooler.spool_overflow, self._queue)
                        tg.start_soon(self._spooler.replayer)
                    await self._dispatch(tg)
        finally:
            done.set()

    async def _dispatch(self, tg: anyio.abc.TaskGroup) -> None:
        slots = self._slots
        assert slots is not None
        while True:
            await self._wait_for_work()
            while self._queue.ready(closing=self._state is not _State.RUNNING):
                if slots.full():
                    # The limits hold hits back: the controller may raise them.
                    self._controller.backlog()
                # Waiting for a free slot lets the queue grow into full batches
                # while Matomo is slow.
                await slots.acquire()
                batch = Batch(*self._queue.take(), worker=True)
                self._in_flight[id(batch)] = batch
                tg.start_soon(self._send_batch, batch)
                await self._pace()
            if self._state is not _State.RUNNING:
                return

    async def _pace(self) -> None:
        # Batches sent together reach Matomo together and wait there for each
        # other: the answer times rise, and the controller cuts what was fine.
        # While running, the batches in flight are spread over an answer time;
        # at shutdown they go at once (a shutdown waits MAX_PACE at most). On a
        # saturated event loop a sleep ends late: the next send is due a pace after
        # the last one was due, not after the late wake-up (at most one pace of
        # credit), or the pace would drift below what the limits allow.
        pace = self._controller.pace()
        if not pace or self._state is not _State.RUNNING:
            return
        now = self._clock()
        self._next_send = max(self._next_send, now - pace) + pace
        if self._next_send > now:
            await anyio.sleep(self._next_send - now)

    async def _wait_for_work(self) -> None:
        while self._state is _State.RUNNING and not self._queue.ready(closing=False):
            self._wake = anyio.Event()
            with anyio.move_on_after(self._queue.wait()):
                await self._wake.wait()

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
        self._delivery.shut_down(self._clock() + self._shutdown_timeout)
        done = self._worker_done
        try:
            if done is not None:
                _set(self._wake)
                self._spooler.stop()
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
        # Popped in place: the direct sender shares the dict.
        worker = [self._in_flight.pop(k) for k, b in list(self._in_flight.items()) if b.worker]
        left = [hit for b in worker for hit in b.hits]
        left += self._queue.drain()
        if left:
            await self._spooler.put_or_drop(left, "shutdown")
        await self._spooler.aclose()
        await self._transport.aclose()
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

    # -- the worker's batches ---------------------------------------------------------

    async def _send_batch(self, batch: Batch) -> None:
        assert self._slots is not None
        try:
            left = await self._delivery.deliver(batch, span=self._retry_deadline)
        except Exception as exc:  # a bug or a broken user client: never kill the worker
            left = batch.hits
            logger.error("asgi_matomo: sending a batch failed unexpectedly: %r", exc)
        finally:
            # On cancellation (aclose past its deadline) the batch stays in
            # _in_flight, where aclose finds it for the spool.
            self._slots.release()
        if left:
            # Once shutdown has begun, its deadline is what cut the retries short.
            closing = self._delivery.shutdown_deadline is not None
            await self._spooler.put_or_drop(left, "shutdown" if closing else "retry_deadline")
        self._in_flight.pop(id(batch), None)
        self._notify_progress()
        if not left:
            self._spooler.want_replay()

    async def _deliver_replayed(self, batch: Batch) -> list[Hit]:
        # A spooled batch gets one attempt: the replayer tries the spool again later.
        return await self._delivery.deliver(batch, span=0.0, attempts=1)


def _set(event: anyio.Event | None) -> None:
    if event is not None:
        event.set()


def _call(hook: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = hook()
    if method is not None:
        method()
