"""What the collector says on its console when it refuses something, rate-limited.

A tracker that sends a wrong idsite sends it with every hit: one line per hit
would bury the console. Each kind of refusal is said at once, then at most once
per interval with the number of refusals of that kind left unsaid meanwhile.
Kinds are a fixed, small set of names, so the bookkeeping stays bounded whatever
the senders do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["WARN_INTERVAL", "RefusalLog"]

LOGGER = logging.getLogger("asgi_matomo")

# Long enough to keep a console readable under a steady stream of bad hits,
# short enough that a fix (or a new mistake) shows up while one is watching.
WARN_INTERVAL = 10.0


@dataclass
class _Kind:
    said_at: float
    unsaid: int = 0


class RefusalLog:
    """Says each kind of refusal at WARNING, at most once per `interval` seconds.

    `clock` is injectable so the rate limit is tested without waiting.
    """

    def __init__(
        self, interval: float = WARN_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def refused(self, kind: str, message: str) -> bool:
        """Say `message` unless a refusal of `kind` was said less than `interval` ago.

        Returns whether a line was written.
        """
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen.said_at < self._interval:
                seen.unsaid += 1
                return False
            unsaid = 0 if seen is None else seen.unsaid
            self._kinds[kind] = _Kind(said_at=now)
        if unsaid:
            LOGGER.warning(
                "collector: %s (and %d more like it since the last such line)", message, unsaid
            )
        else:
            LOGGER.warning("collector: %s", message)
        return True
