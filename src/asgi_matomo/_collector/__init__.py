"""A local stand-in for a Matomo 5.1 server: what tests and the demo send hits to.

Every answer follows what Matomo's tracker does (read from its source and
verified on a real Matomo 5.1.2). Standard library only: the package's one runtime
dependency is httpx and the collector must not add another.
"""

from __future__ import annotations

from asgi_matomo._collector._serve import serve
from asgi_matomo._collector._server import (
    BRUTE_FORCE_LIMIT,
    GIF,
    PAGE_HITS,
    PAGE_VISITS,
    Collector,
    ReceivedRequest,
    StoredHit,
    Totals,
)

__all__ = [
    "BRUTE_FORCE_LIMIT",
    "GIF",
    "PAGE_HITS",
    "PAGE_VISITS",
    "Collector",
    "ReceivedRequest",
    "StoredHit",
    "Totals",
    "serve",
]
