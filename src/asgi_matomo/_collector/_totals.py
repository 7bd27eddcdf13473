"""What the collector counts: exact totals, whatever it still keeps.

The collector keeps the latest hits and requests only (a long demo or a load
test would fill the memory otherwise); tests and benchmarks compare counts of
everything, so they are kept apart, as plain integers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asgi_matomo._collector._model import ReceivedRequest
    from asgi_matomo._collector._store import HitStore

__all__ = ["MAX_REQUESTS_KEPT", "RequestLog", "Totals"]

# Enough for any test to look at each request it made; about 2 MB.
MAX_REQUESTS_KEPT = 10_000


@dataclass(frozen=True)
class Totals:
    """Everything the collector took since it started (`/api/totals`).

    `hits_stored` counts every hit stored (in a file kept from an earlier run
    too), `hits_evicted` those dropped since to stay within `max_hits`;
    `sites` the hits stored per site id (the first 1,000 sites; the hits of
    others in `other_sites`). `requests` counts the tracking requests
    answered; `elements`, `tracked` and `invalid` add up theirs (see
    `ReceivedRequest`); `errors` counts the ones answered with another status
    than 200 or 204, or not answered.
    """

    hits_stored: int
    hits_kept: int
    hits_evicted: int
    max_hits: int | None
    sites: dict[int, int] = field(default_factory=dict)
    other_sites: int = 0
    requests: int = 0
    elements: int = 0
    tracked: int = 0
    invalid: int = 0
    errors: int = 0

    @classmethod
    def of(cls, store: HitStore, requests: RequestLog) -> Totals:
        """The totals now (the caller holds the collector's lock)."""
        return cls(
            hits_stored=store.count,
            hits_kept=store.kept,
            hits_evicted=store.evicted,
            max_hits=store.max_hits,
            sites=dict(store.sites),
            other_sites=store.other_sites,
            requests=requests.count,
            elements=requests.elements,
            tracked=requests.tracked,
            invalid=requests.invalid,
            errors=requests.errors,
        )

    def to_json(self) -> dict[str, Any]:
        """The totals as a JSON-ready dict (site ids become strings, as JSON keys)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["sites"] = {str(site): count for site, count in sorted(self.sites.items())}
        return data


class RequestLog:
    """The latest `keep` tracking requests, and the sums of all of them.

    Not locked: the collector holds its lock around every use.
    """

    def __init__(self, keep: int = MAX_REQUESTS_KEPT) -> None:
        self.latest: deque[ReceivedRequest] = deque(maxlen=keep)
        self.count = 0
        self.elements = 0
        self.tracked = 0
        self.invalid = 0
        self.errors = 0

    def add(self, request: ReceivedRequest) -> None:
        self.latest.append(request)
        self.count += 1
        self.elements += request.elements
        self.tracked += request.tracked
        self.invalid += request.invalid
        self.errors += request.status not in (200, 204)
