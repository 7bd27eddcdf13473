"""How long a failed batch waits before it is tried again: the retry policy, no I/O.

The sender's own backoff is exponential with a floor and jitter: retry n waits
between half and all of min(RETRY_CAP, RETRY_BASE * 2**(n-1)) seconds, so n
retries never take less than about RETRY_BASE * 2**(n-2) seconds, and batches
of many processes that failed together spread out. A `Retry-After` can only
lengthen that wait (Matomo, or a proxy, asking for a pause), never shorten it:
"0", a negative value or a date in the past wait the own backoff, and a huge
value waits at most RETRY_AFTER_CAP. A wait asked for gets up to
RETRY_AFTER_JITTER more, so the processes told the same date do not come back
in the same instant. The spool's replay follows the same rule (`replay_delay`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = [
    "DIRECT_ATTEMPTS",
    "RETRY_AFTER_CAP",
    "RETRY_BASE",
    "RETRY_CAP",
    "backoff_delay",
    "replay_delay",
    "retries_within",
    "retry_delay",
]

RETRY_BASE = 0.5
RETRY_CAP = 30.0
# The longest wait a Retry-After can ask for; the batch is tried again after it
# (within retry_deadline), rather than given up at once or parked for hours.
RETRY_AFTER_CAP = 120.0
# A wait asked for by Retry-After is lengthened by up to this fraction.
RETRY_AFTER_JITTER = 0.2
# Direct mode sends while a request finishes; a few quick attempts, no long backoff.
DIRECT_ATTEMPTS = 3


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The own delay before retry number `attempt` (1-based): half fixed, half jitter."""
    ceiling: float = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt - 1, 32))
    return ceiling * (0.5 + 0.5 * rand())


def retry_delay(
    attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before retry number `attempt`, given the answer's Retry-After (if any)."""
    r = rand()
    own = backoff_delay(attempt, lambda: r)
    # `not >` also sends a NaN (parse_retry_after never returns one) to the own backoff.
    if retry_after is None or not retry_after > own:
        return own
    return min(retry_after, RETRY_AFTER_CAP) * (1.0 + RETRY_AFTER_JITTER * r)


def replay_delay(
    failures: int, retry_after: float | None = None, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before the spool is tried again after `failures` replays in a row failed.

    Half fixed, half jitter, so that workers sharing a spool spread their attempts
    and a Matomo that is back is noticed within RETRY_CAP seconds. The last
    answer's Retry-After lengthens it by the rule of `retry_delay`.
    """
    r = rand()
    ceiling = min(RETRY_CAP, 2 * RETRY_BASE * 2.0 ** min(failures - 1, 32))
    own = ceiling * (0.5 + 0.5 * r)
    if retry_after is None or not retry_after > own:
        return own
    return min(retry_after, RETRY_AFTER_CAP) * (1.0 + RETRY_AFTER_JITTER * r)


def retries_within(window: float) -> int:
    """The most retries one batch can make in `window` seconds, whatever Matomo answers."""
    total = 0.0
    n = 0
    while True:
        total += backoff_delay(n + 1, lambda: 0.0)  # the shortest wait before retry n + 1
        if total > window:
            return n
        n += 1
