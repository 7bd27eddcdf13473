"""Direct mode: without a lifespan, each request's own task sends its hits.

Without a lifespan there is no place for the background task: the request's own
task sends its hits after its response (`BatchSender.send_now`), within the same
limits. At most as many requests send at once as the controller allows (never
more than `max_concurrent_batches`); the hits of a request that finds them all
busy wait in the queue (then the spool, then the counters, as in the background
mode), and the requests that are sending take them, in batches, before they
finish. The requests' tasks are awaited by the server at shutdown. A sender
task started by the first request was the other way, not taken: nothing would
stop it (without a lifespan no one tells the app that the server stops, so what
it held would be lost uncounted when the loop ends), trio has no task to start
without a nursery, and test clients that run each request on an event loop of
its own would leave it behind on a closed loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

from ._adaptive import Controller
from ._delivery import Batch, Delivery
from ._hit import Hit
from ._queue import HitQueue
from ._replay import Spooler
from ._report import WHY, Reporter
from ._retry import DIRECT_ATTEMPTS, replay_delay

__all__ = ["DirectSender"]

logger = logging.getLogger("asgi_matomo")


class DirectSender:
    """Sends hits on the requests' own tasks; one per process (a forked child makes its own).

    Parameters:
        queue, controller, delivery, spooler, reporter: the sender's, shared with
            its background mode.
        in_flight: the sender's batches in flight, by id (it changes the dict in
            place, never replaces it); direct batches are added while they are sent.
        progress: called when a batch left `in_flight` (for `aflush`).
        idle: whether the sender is idle (no worker, not closing): only then do
            requests hold hits for each other and take what waits.
        closed: whether the sender is closed: hits are then dropped.
        http_timeout: seconds one request may take; also about how long a
            request's task sends.
        clock: monotonic time source.
    """

    def __init__(
        self,
        *,
        queue: HitQueue,
        controller: Controller,
        delivery: Delivery,
        spooler: Spooler,
        reporter: Reporter,
        in_flight: dict[int, Batch],
        progress: Callable[[], None],
        idle: Callable[[], bool],
        closed: Callable[[], bool],
        http_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._controller = controller
        self._delivery = delivery
        self._spooler = spooler
        self._reporter = reporter
        self._in_flight = in_flight
        self._progress = progress
        self._idle = idle
        self._closed = closed
        self._http_timeout = http_timeout
        self._clock = clock
        # Requests sending their hits, now.
        self._busy = 0
        # Batches given up in a row, and until when (clock) no request sends
        # after the last one: each request would otherwise try Matomo anew.
        self._failures = 0
        self._pause = -math.inf
        self._spooling = False  # a request is moving what waits to the spool

    async def send_now(self, hits: Sequence[Hit]) -> None:
        """Send hits in a bulk request right away, without the worker. Never raises.

        For servers that never run the ASGI lifespan: a failed request is retried
        a few times within about `http_timeout`, then the hits are spooled or
        dropped. When the most requests allowed are sending already, the hits
        wait in the queue for one of them (see the module's docstring) and this
        returns at once.
        """
        hits = list(hits)
        if not hits:
            return
        self._reporter.counters.submitted += len(hits)
        if self._closed():
            self._reporter.drop(len(hits), "not_running", "the sender is closed")
            return
        if self._idle():
            if self._busy >= self._controller.concurrency:
                # The limits hold these hits back: the controller may raise them.
                self._controller.backlog()
                self._hold(hits)
                return
            if self._clock() < self._pause:
                self._hold(hits)
                await self._spool_held()
                return
        self._busy += 1
        try:
            # What waits is taken for about http_timeout at most: while requests keep
            # coming, the next one takes over rather than this task sending forever.
            until = self._clock() + self._http_timeout
            self._queue.seq += 1
            delivered = await self._send(hits, self._queue.seq)
            await self._drain(delivered, until)
        finally:
            self._busy -= 1
        await self._spool_held()

    async def _spool_held(self) -> None:
        """In the pause after a failure, with a spool: move what waits in memory there."""
        # Nothing sends from memory before a request comes after the pause, and
        # the process may end first. One request at a time, in one write.
        if (
            self._spooler.spool is None
            or not self._idle()
            or self._spooling
            or not len(self._queue)
            or self._clock() >= self._pause
        ):
            return
        self._spooling = True
        try:
            await self._spooler.put_or_drop(self._queue.drain(), "retry_deadline")
        finally:
            self._spooling = False

    def _hold(self, hits: list[Hit]) -> None:
        """Queue a request's hits for the requests sending (now or later); never waits."""
        queue = self._queue
        for hit in hits:
            if len(queue.entries) < queue.max_size:
                queue.append(hit)
            elif self._spooler.spool is not None and len(queue.overflow) < queue.max_size:
                queue.overflow.append(hit)
            else:
                self._reporter.drop(1, "queue_full", WHY["queue_full"])

    async def _drain(self, delivered: bool, until: float) -> None:
        """Send what waits in the queue, batch by batch, while this request may send.

        `delivered`: whether Matomo took this request's last batch. After a batch it
        did not take, what waits is left to the next request: a request's task
        must not spend an outage retrying batch after batch (the server waits for
        it at shutdown). Past `until` (clock), hits that arrived meanwhile show
        that requests keep coming: this one leaves what waits to them. Under a
        steady load the queue never empties, and a task that took batch after
        batch would never end (a server, or an adapter such as Mangum, that waits
        for the app's call would wait as long). Once requests stop coming, it
        takes what is left (at most `max_queue_size` hits).
        """
        queue = self._queue
        seen = queue.seq
        while self._idle():
            if queue.overflow:
                overflow, queue.overflow = queue.overflow, []
                await self._spooler.put_or_drop(overflow, "queue_full")
                continue
            # Above the limit (it fell after a push-back), this request leaves the
            # rest to the others sending: there is at least one.
            if (
                not delivered
                or not queue.entries
                or self._busy > self._controller.concurrency
                or (queue.seq != seen and self._clock() >= until)
                or self._clock() < self._pause
            ):
                return
            seen = queue.seq
            hits, first_seq = queue.take()
            delivered = await self._send(hits, first_seq)

    async def _send(self, hits: list[Hit], first_seq: int) -> bool:
        """Deliver one batch; False when Matomo did not take it (spooled or dropped)."""
        batch = Batch(hits, first_seq, worker=False)
        self._in_flight[id(batch)] = batch
        try:
            try:
                left = await self._delivery.deliver(
                    batch, span=self._http_timeout, attempts=DIRECT_ATTEMPTS
                )
            except Exception as exc:
                left = batch.hits
                logger.error("asgi_matomo: sending hits failed unexpectedly: %r", exc)
            except BaseException:
                # The request's task was cancelled (the server stopped it): what it
                # had not delivered yet is lost, and counted.
                if batch.hits:
                    self._reporter.drop(
                        len(batch.hits), "cancelled", "the request sending them was cancelled"
                    )
                raise
            if left:
                await self._spooler.put_or_drop(left, "retry_deadline")
        finally:
            # Also when the request's task is cancelled: a stale batch would
            # hold up aflush() forever.
            self._in_flight.pop(id(batch), None)
            self._progress()
        if left:
            # Until the backoff (or Matomo's Retry-After, by the rule of the
            # spool's replay) has passed, the requests that come leave their hits
            # in the queue: an outage must not get one request per app request.
            self._failures += 1
            pause = replay_delay(self._failures, batch.retry_after)
            self._pause = max(self._pause, self._clock() + pause)
            return False
        self._failures = 0
        if self._spooler.spool is not None:
            # One spooled batch per batch sent at most: direct mode runs on the
            # request's task, it must not turn into a long replay.
            await self._spooler.replay(max_batches=1)
        return True
