"""The collector's own pages: the live visits log and the JSON API behind it."""

from __future__ import annotations

import secrets
import zlib
from typing import TYPE_CHECKING

from asgi_matomo._collector._page import render_page, render_visits
from asgi_matomo._collector._rules import DIGITS, query_params
from asgi_matomo._collector._wire import Answer, Handler, json_answer

if TYPE_CHECKING:
    from asgi_matomo._collector._server import Collector

__all__ = [
    "DEFAULT_API_LIMIT",
    "PAGE_HITS",
    "PAGE_VISITS",
    "api_hits",
    "api_totals",
    "api_visits",
    "page",
    "visits_fragment",
]

DEFAULT_API_LIMIT = 100
# The visits log groups this many of the latest hits and shows this many visits:
# bounded work per refresh, and a page a browser keeps up with.
PAGE_HITS = 1000
PAGE_VISITS = 100
MAX_API_LIMIT = 1000


def _page_version(collector: Collector, q: str) -> str:
    """The ETag of the visits list: the page changes only when hits arrive."""
    return f'"{collector._page_epoch}-{collector._hit_store.count}-{zlib.crc32(q.encode()):08x}"'


def page(collector: Collector, query: str) -> Answer:
    """The visits log, `/`: a whole page with its style and script inline."""
    nonce = secrets.token_urlsafe(16)
    q = query_params(query).get("q", "")
    version = _page_version(collector, q)
    html = render_page(
        collector.visits(q=q, last_hits=PAGE_HITS),
        nonce,
        q=q,
        version=version,
        dimension_names=collector._dimensions,
        hits_kept=collector._hit_store.kept,
        hits_evicted=collector._hit_store.evicted,
        hits_limit=PAGE_HITS,
        visits_limit=PAGE_VISITS,
    )
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
        " connect-src 'self'; base-uri 'none'; form-action 'none'"
    )
    return Answer(
        200,
        html.encode(),
        "text/html; charset=utf-8",
        {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"},
    )


def visits_fragment(collector: Collector, handler: Handler, query: str) -> Answer:
    """The page's visits list alone, which its script asks for every second."""
    q = query_params(query).get("q", "")
    version = _page_version(collector, q)
    headers = {"Cache-Control": "no-store", "ETag": version}
    if handler.headers.get("If-None-Match") == version:
        # Nothing new: no query, no grouping, no rendering while a page is left open.
        return Answer(304, headers=headers)
    fragment = render_visits(
        collector.visits(q=q, last_hits=PAGE_HITS),
        q=q,
        dimension_names=collector._dimensions,
        hits_kept=collector._hit_store.kept,
        hits_evicted=collector._hit_store.evicted,
        hits_limit=PAGE_HITS,
        visits_limit=PAGE_VISITS,
    )
    headers["X-Content-Type-Options"] = "nosniff"
    return Answer(200, fragment.encode(), "text/html; charset=utf-8", headers)


def api_visits(collector: Collector, query: str) -> Answer:
    """`/api/visits`: the visits as JSON, newest first."""
    params = query_params(query)
    last_hits = _int_param(params.get("last_hits"), PAGE_HITS)
    if last_hits is None:
        return json_answer(400, {"error": "last_hits is an integer"})
    visits = collector.visits(q=params.get("q", ""), last_hits=max(1, min(last_hits, PAGE_HITS)))
    return json_answer(200, [visit.to_json() for visit in visits])


def api_hits(collector: Collector, query: str) -> Answer:
    """`/api/hits`: the stored hits as JSON, newest first."""
    params = query_params(query)
    limit = _int_param(params.get("limit"), DEFAULT_API_LIMIT)
    since_id = _int_param(params.get("since_id"), 0)
    if limit is None or since_id is None:
        return json_answer(400, {"error": "limit and since_id are integers"})
    hits = collector.api_hits(
        limit=max(1, min(limit, MAX_API_LIMIT)), q=params.get("q", ""), since_id=since_id
    )
    return json_answer(200, [hit.to_json() for hit in hits])


def api_totals(collector: Collector) -> Answer:
    """`/api/totals`: exact counts of everything stored and answered (see `Totals`)."""
    return json_answer(200, collector.totals().to_json())


def _int_param(value: str | None, default: int) -> int | None:
    if value is None or value == "":
        return default
    return int(value) if DIGITS.fullmatch(value) else None
