"""The unit of work between the request path and the sender."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

# Matomo accepts a custom timestamp (`cdt`) without `token_auth` only while it is
# younger than this (core/Tracker/Request.php,
# tracking_requests_require_authentication_when_custom_timestamp_newer_than).
UNAUTHENTICATED_MAX_AGE = 86400.0


class Hit(NamedTuple):
    """One Matomo tracking request, encoded once on the request path.

    A named tuple: immutable like a frozen dataclass, and several times cheaper
    to create, which every tracked request does.

    `query` holds every parameter except the three whose fate depends on the
    token: `cdt` (refused for old hits without a token), `cip` (refused without a
    token) and `token_auth` itself (never in a query, only in the bulk body). The
    sender adds `cdt` and `cip` when it encodes the hit for a batch.
    """

    query: str
    timestamp: float
    cip: str | None = None

    def encode(self, *, authenticated: bool) -> str:
        """The query string of one bulk element, starting with `?`."""
        parts = f"?{self.query}&cdt={int(self.timestamp)}"
        if authenticated and self.cip is not None:
            parts += "&cip=" + quote(self.cip, safe="")
        return parts

    def too_old(self, now: float, *, authenticated: bool) -> bool:
        """True when Matomo would refuse this hit for its age."""
        return not authenticated and now - self.timestamp >= UNAUTHENTICATED_MAX_AGE
