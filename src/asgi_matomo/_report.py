"""What the sender tells: its counters and its log lines, each bounded.

Every hit ends up in exactly one counter (see `Stats`), and every repeated
condition (Matomo down, a full queue) makes one log line per `LOG_INTERVAL`, not
one per hit or per attempt: the log of a busy app behind a broken Matomo stays
readable and small.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LOG_INTERVAL", "WHY", "Counters", "Reporter", "Stats", "Throttle"]

# A repeated warning (Matomo down, queue full) is logged at most once per this many seconds.
LOG_INTERVAL = 60.0
# Distinct refusal causes remembered for the duplicate filter; beyond this, no more lines.
MAX_CAUSES = 64

logger = logging.getLogger("asgi_matomo")

# Why hits were dropped, by the key their warning is throttled under.
WHY = {
    "queue_full": "the queue is full (Matomo too slow or down)",
    "retry_deadline": "Matomo did not accept them before the retry deadline",
    "shutdown": "Matomo had not taken them when the shutdown deadline (shutdown_timeout) passed",
    "spool_full": "the spool is full: it evicted its oldest hits",
    "too_old": "hits older than 24 h cannot be tracked without a valid access_token",
}


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
    # Where the adaptive limits stand now (within max_concurrent_batches / batch_size).
    concurrency: int = 0  # batches the sender lets be in flight at once
    batch_size: int = 0  # the most hits it puts in one batch


@dataclass(slots=True)
class Counters:
    submitted: int = 0
    sent: int = 0
    retried: int = 0
    invalid: int = 0
    rejected: int = 0
    dropped: int = 0
    spooled: int = 0
    replayed: int = 0
    batches: int = 0


class Throttle:
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


class Reporter:
    """The sender's counters and its throttled or once-only log lines.

    The counters belong to one process (a forked child starts from zero); what
    was already logged stays logged.
    """

    __slots__ = ("_causes", "_throttle", "counters")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.counters = Counters()
        self._throttle = Throttle(clock)
        self._causes: set[str] = set()

    def drop(self, n: int, key: str, why: str) -> None:
        self.counters.dropped += n
        self.warn(f"drop:{key}", "asgi_matomo: dropped %d hits: %s", n, why)

    def warn(self, key: str, message: str, *args: object) -> None:
        suppressed = self._throttle.allow(key)
        if suppressed is None:
            return
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        logger.warning(message, *args)

    def log_once(self, key: str, level: int, message: str, *args: object) -> None:
        if key in self._causes or len(self._causes) >= MAX_CAUSES:
            return
        self._causes.add(key)
        logger.log(level, message, *args)
