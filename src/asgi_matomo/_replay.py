"""The sender's spool side: hits that could not be delivered go there, and come back.

What the queue cannot hold, what Matomo did not take before the retry deadline,
and what is left at shutdown is written to the spool (`SpoolProtocol`, blocking
methods run in a worker thread). A background task sends it back, oldest first,
when Matomo answers again, and also without traffic, backing off while Matomo
stays down. A `Retry-After` in Matomo's answer to a replayed batch is honoured
as the live sender does (`_retry`): nothing is replayed before it has passed,
whatever else says that Matomo is back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import anyio.to_thread

from ._delivery import Batch, Slots
from ._hit import Hit
from ._queue import HitQueue, Limits
from ._report import WHY, Reporter
from ._retry import RETRY_CAP, replay_delay

__all__ = ["SpoolProtocol", "Spooler", "look_interval"]

# SqliteSpool's default lease (not imported: _spool loads sqlite3, needed only with a spool).
DEFAULT_LEASE_SECONDS = 60.0
# However short a spool's lease, it is not read more often than this.
MIN_LOOK_INTERVAL = 0.1


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


def look_interval(lease_seconds: object) -> float:
    """Seconds between two looks at a spool that seemed empty: half its lease, 30 s at most.

    A row leased by a process that died is claimable once its lease expires, so
    a running process claims it at most this long after the lease expired: 30 s
    with SqliteSpool's default 60 s lease (90 s after it was leased).
    """
    lease = DEFAULT_LEASE_SECONDS
    if (
        isinstance(lease_seconds, (int, float))
        and not isinstance(lease_seconds, bool)
        and lease_seconds > 0  # False for NaN too
    ):
        lease = float(lease_seconds)
    return max(MIN_LOOK_INTERVAL, min(RETRY_CAP, lease / 2))


class Spooler:
    """Puts hits into the spool (or drops them without one) and replays it; one per process."""

    def __init__(
        self,
        spool: SpoolProtocol | None,
        *,
        reporter: Reporter,
        deliver: Callable[[Batch], Awaitable[list[Hit]]],
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self._reporter = reporter
        self._deliver = deliver
        self._limits = limits
        self._clock = clock
        # Replays that failed in a row, and when (clock) the replayer tries again.
        self._failures = 0
        self._retry_at = -math.inf
        # Until when Matomo asked (Retry-After) not to be sent the spool: binding.
        self._held_until = -math.inf
        self._look_interval = look_interval(getattr(spool, "lease_seconds", None))
        # Without the replayer (direct mode), when a spool that seemed empty is counted again.
        self._next_look = -math.inf
        # Whether the spool holds hits; None: not checked yet in this process.
        self.pending: bool | None = None
        self._replaying = False
        self._puts = 0
        # While the background worker runs: its slots for batches in flight, its
        # wake-up events, and whether it still accepts hits.
        self.running = False
        self.slots: Slots | None = None
        self.overflowed: anyio.Event | None = None
        self.wanted: anyio.Event | None = None

    def start(self, slots: Slots) -> None:
        self.slots = slots
        self.overflowed = anyio.Event()
        self.wanted = anyio.Event()
        self.running = True

    def stop(self) -> None:
        """Shutdown begins: the background loops end, the spool keeps what it holds."""
        self.running = False
        _set(self.overflowed)
        _set(self.wanted)

    async def put_or_drop(self, hits: list[Hit], reason: str) -> None:
        if self.spool is not None:
            try:
                evicted = await anyio.to_thread.run_sync(self.spool.put, hits)
            except Exception as exc:
                self._reporter.warn(
                    "spool_put", "asgi_matomo: writing to the spool failed: %r", exc
                )
            else:
                self._reporter.counters.spooled += len(hits)
                self.pending = True
                self._puts += 1
                if evicted:
                    self._reporter.drop(evicted, "spool_full", WHY["spool_full"])
                return
        why = WHY[reason]
        if self.spool is not None:
            why += "; the spool could not take them either"
        elif reason == "shutdown":
            why += "; set spool_path to keep undelivered hits on disk for the next start"
        self._reporter.drop(len(hits), reason, why)

    async def spool_overflow(self, queue: HitQueue) -> None:
        """Background task: move what found the queue full into the spool."""
        # Its own task: the dispatcher may be waiting for a free slot for a long
        # time while Matomo is slow, and that is exactly when the queue overflows.
        while self.running:
            assert self.overflowed is not None
            await self.overflowed.wait()
            self.overflowed = anyio.Event()
            while queue.overflow and self.running:
                hits, queue.overflow = queue.overflow, []
                await self.put_or_drop(hits, "queue_full")

    async def replayer(self) -> None:
        """Background task: replay the spool when asked to, and on a timer.

        On a timer twice: after a failed replay (backing off), and every
        `look_interval` while the spool seemed empty, for the hits another process
        leased and never acked (it was killed): their lease expires, and nothing
        else would tell this process that they are there.
        """
        # A trigger that arrives while a replay runs sets the event again, so
        # the spool is looked at once more: no "Matomo is back" is ever lost.
        assert self.wanted is not None
        self.wanted.set()  # hits left by a previous process
        while self.running:
            # Hits still waiting after a replay means Matomo did not take them: try
            # again later, also without traffic (nothing else would notice Matomo is
            # back), backing off up to RETRY_CAP, or as long as Matomo asked.
            if self.pending:
                now = self._clock()
                if self._retry_at <= now:
                    # No failed batch set the time (reading the spool failed): back off.
                    self._failed(None)
                delay = self._retry_at - now
            else:
                delay = self._look_interval
            with anyio.move_on_after(delay) as timer:
                await self.wanted.wait()
            self.wanted = anyio.Event()
            if timer.cancelled_caught and not self.pending:
                self.pending = None  # count again: expired leases of another process
            await self.replay()

    def want_replay(self) -> None:
        """Matomo answers again: time to bring back what was spooled."""
        if self.pending and not self._held():
            _set(self.wanted)

    def _held(self) -> bool:
        """Whether Matomo's Retry-After still holds the replay back."""
        return self._held_until != -math.inf and self._clock() < self._held_until

    def _failed(self, retry_after: float | None) -> None:
        """A replay failed: when to try again (as asked, if Matomo asked)."""
        self._failures += 1
        self._retry_at = self._clock() + replay_delay(self._failures, retry_after)
        # Without a Retry-After the backoff is the sender's own: a live batch that
        # Matomo takes ends it early. With one, Matomo asked for the pause.
        self._held_until = self._retry_at if retry_after is not None else -math.inf

    async def replay(self, max_batches: int | None = None) -> None:
        """Send spooled hits, oldest first, while Matomo accepts them."""
        spool = self.spool
        if spool is None or self._replaying or self._held():
            return
        if not self.running and self._clock() < self._retry_at:
            # Direct mode: every request Matomo takes would try a failing spool
            # again at once. (The replayer's own trigger, a live batch taken, ends
            # its backoff early on purpose; it replays once per such batch at most.)
            return
        self._replaying = True
        try:
            if self.pending is False and not self.running and self._clock() >= self._next_look:
                # No replayer looks again in direct mode: leases of a process that
                # died expire, and nothing else would tell this one they are there.
                self.pending = None
            if self.pending is None:
                self._next_look = self._clock() + self._look_interval
                waiting = await anyio.to_thread.run_sync(spool.count)
                # A put while count() ran already knows better.
                if self.pending is None:
                    self.pending = waiting > 0
            done = 0
            while self.pending and (max_batches is None or done < max_batches):
                # The worker stops replaying at shutdown: the spool keeps the rest.
                if max_batches is None and not self.running:
                    return
                if not await self._replay_batch(spool):
                    return
                done += 1
        except Exception as exc:
            self._reporter.warn("spool_read", "asgi_matomo: reading the spool failed: %r", exc)
        finally:
            self._replaying = False

    async def _replay_batch(self, spool: SpoolProtocol) -> bool:
        """Claim, send and ack one batch; False when the spool is empty or Matomo failed."""
        slots = self.slots if self.running else None
        if slots is not None:
            await slots.acquire()
        try:
            puts = self._puts
            claimed = await anyio.to_thread.run_sync(spool.claim, self._limits.batch)
            if not claimed:
                # Unless hits were put while claim() ran, the spool is empty.
                self.pending = puts != self._puts
                return False
            ids = {id(hit): sid for sid, hit in claimed}
            batch = Batch([hit for _, hit in claimed], 0, worker=False)
            try:
                left = await self._deliver(batch)
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
            self._reporter.counters.replayed += batch.tracked
            if left_ids:
                self._failed(batch.retry_after)
                await anyio.to_thread.run_sync(spool.release, sorted(left_ids))
                return False
            self._failures = 0
            self._retry_at = -math.inf
            return True
        finally:
            if slots is not None:
                slots.release()

    async def aclose(self) -> None:
        if self.spool is not None:
            try:
                await anyio.to_thread.run_sync(self.spool.close)
            except Exception as exc:
                self._reporter.warn("spool_close", "asgi_matomo: closing the spool failed: %r", exc)


def _set(event: anyio.Event | None) -> None:
    if event is not None:
        event.set()
