"""The sender's memory: a bounded queue of hits and when a batch of them is due. No I/O.

A batch is due when a batch's worth of hits waits (`limits.batch`, which the
sender adapts to Matomo), when the oldest waited
`flush_interval` seconds, when a flush asked for it, or at shutdown.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from ._hit import Hit

__all__ = ["HitQueue"]

# (sequence number, clock() when queued, *the hit's fields), oldest on the left.
# Plain tuples of strings and numbers, not Hit objects: the garbage collector
# stops tracking such tuples after their first collection, so a backlog of a
# slow Matomo does not make every full collection longer.
_Entry = tuple[int, float, str, float, str | None]


class Limits(Protocol):
    batch: int  # the most hits in one batch


class HitQueue:
    """Hits waiting in memory, oldest first, numbered in the order they came."""

    __slots__ = (
        "_clock",
        "entries",
        "flush_interval",
        "flush_upto",
        "limits",
        "max_size",
        "overflow",
        "seq",
    )

    def __init__(
        self, *, max_size: int, limits: Limits, flush_interval: float, clock: Callable[[], float]
    ) -> None:
        self.max_size = max_size
        self.limits = limits
        self.flush_interval = flush_interval
        self._clock = clock
        self.entries: deque[_Entry] = deque()
        # Hits that found the queue full, on their way to the spool.
        self.overflow: list[Hit] = []
        self.seq = 0  # the number of the last hit queued (or batch sent directly)
        self.flush_upto = 0  # hits numbered up to this are due now

    def __len__(self) -> int:
        return len(self.entries) + len(self.overflow)

    def append(self, hit: Hit) -> bool:
        """Queue `hit` (the caller checked there is room); True when the worker's plan changes.

        A first hit starts the interval clock, a full batch is ready now.
        """
        entries = self.entries
        self.seq += 1
        query, timestamp, cip = hit
        entries.append((self.seq, self._clock(), query, timestamp, cip))
        return len(entries) == 1 or len(entries) == self.limits.batch

    def flush(self) -> int:
        """Make everything queued due now; returns the number of the last hit."""
        self.flush_upto = self.seq
        return self.seq

    def ready(self, *, closing: bool) -> bool:
        """Whether a batch is due now."""
        if not self.entries:
            return False
        first = self.entries[0]
        seq, queued_at = first[0], first[1]
        return (
            len(self.entries) >= self.limits.batch
            or closing
            or seq <= self.flush_upto
            or self._clock() - queued_at >= self.flush_interval
        )

    def wait(self) -> float:
        """Seconds until the oldest hit is due by the interval (inf when empty)."""
        if not self.entries:
            return math.inf
        return self.entries[0][1] + self.flush_interval - self._clock()

    def take(self) -> tuple[list[Hit], int]:
        """The oldest hits, up to a batch, and the number of the first."""
        n = min(self.limits.batch, len(self.entries))
        items = [self.entries.popleft() for _ in range(n)]
        return _hits_of(items), items[0][0]

    def oldest(self) -> float:
        """The number of the oldest hit queued (inf when empty)."""
        return float(self.entries[0][0]) if self.entries else math.inf

    def drain(self) -> list[Hit]:
        """Everything waiting, the queue's and the overflow's, which are emptied."""
        left = _hits_of(self.entries) + self.overflow
        self.clear()
        return left

    def clear(self) -> None:
        self.entries.clear()
        self.overflow = []


def _hits_of(entries: Iterable[_Entry]) -> list[Hit]:
    return [Hit(query, timestamp, cip) for _, _, query, timestamp, cip in entries]
