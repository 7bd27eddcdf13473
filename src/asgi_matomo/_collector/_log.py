"""What the collector says on its console when it refuses something, rate-limited.

A tracker that sends a wrong idsite sends it with every hit: one line per hit
would bury the console. Each reason for a refusal (its kind, such as `idsite`,
and what exactly was wrong, such as "site 7 is not served") is said at once,
then at most once per interval with the number of refusals for that reason
left unsaid meanwhile. So a second mistake (site 7 after site 3, a wrong token
after a wrong idsite) is said as soon as it happens, not hidden behind the first.

Senders choose the reasons (any idsite, any peer address): at most
`MAX_REASONS` are followed. When the table is full, the reasons whose line is
old and that have no count left unsaid are forgotten; a new reason that still
finds no room shares its kind's overflow line ("... and N more like it"), so
the console stays readable and the bookkeeping bounded whatever the senders do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_REASONS", "WARN_INTERVAL", "RefusalLog"]

LOGGER = logging.getLogger("asgi_matomo")

# Long enough to keep a console readable under a steady stream of bad hits,
# short enough that a fix (or a new mistake) shows up while one is watching.
WARN_INTERVAL = 10.0
# More different mistakes than anyone reads on a console, few enough that the
# table costs nothing (about 200 bytes a reason).
MAX_REASONS = 256
# A full table is looked through for reasons to forget at most this often, so
# a flood of new reasons costs no scan per refusal.
SWEEP_INTERVAL = 1.0
# The reason of a kind's overflow line: no reason a caller gives starts with NUL.
_OVERFLOW = "\0overflow"


@dataclass
class _Said:
    said_at: float
    unsaid: int = 0


class RefusalLog:
    """Says each reason for a refusal at WARNING, at most once per `interval` seconds.

    `clock` is injectable so the rate limit is tested without waiting.
    """

    def __init__(
        self,
        interval: float = WARN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_reasons: int = MAX_REASONS,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._max_reasons = max_reasons
        self._said: dict[tuple[str, str], _Said] = {}
        self._swept_at = -float("inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many reasons are followed now (at most `max_reasons` plus one per kind)."""
        with self._lock:
            return len(self._said)

    def refused(self, kind: str, message: str, reason: str = "") -> bool:
        """Say `message` unless the same (`kind`, `reason`) was said less than `interval` ago.

        `kind` is one of a few fixed names; `reason` tells apart the mistakes of
        one kind (a site id, a peer), without the parts that change with every
        hit (an element's index, a count). Returns whether a line was written.
        """
        now = self._clock()
        with self._lock:
            key = self._key(kind, reason, now)
            seen = self._said.get(key)
            if seen is not None and now - seen.said_at < self._interval:
                seen.unsaid += 1
                return False
            unsaid = 0 if seen is None else seen.unsaid
            self._said[key] = _Said(said_at=now)
        if unsaid:
            LOGGER.warning(
                "collector: %s (and %d more like it since the last such line)", message, unsaid
            )
        else:
            LOGGER.warning("collector: %s", message)
        return True

    def _key(self, kind: str, reason: str, now: float) -> tuple[str, str]:
        key = (kind, reason)
        if key in self._said or len(self._said) < self._max_reasons:
            return key
        # Full: forget the reasons whose line is old and that have nothing left
        # unsaid (a repeat would be said at once anyway), then look again.
        if now - self._swept_at >= SWEEP_INTERVAL:
            self._swept_at = now
            stale = [
                old
                for old, said in self._said.items()
                if not said.unsaid and now - said.said_at >= self._interval
            ]
            for old in stale:
                del self._said[old]
            if len(self._said) < self._max_reasons:
                return key
        return (kind, _OVERFLOW)
