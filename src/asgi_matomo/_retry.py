"""How long a failed batch waits before it is tried again: the retry policy, no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["DIRECT_ATTEMPTS", "RETRY_BASE", "RETRY_CAP", "backoff_delay", "replay_delay"]

# Full-jitter exponential backoff: retry n sleeps uniformly in [0, min(cap, base * 2**(n-1))].
RETRY_BASE = 0.5
RETRY_CAP = 30.0
# Direct mode sends while a request finishes; a few quick attempts, no long backoff.
DIRECT_ATTEMPTS = 3


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
