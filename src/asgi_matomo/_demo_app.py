"""The demo's example app and the traffic the demo sends it.

The app runs under uvicorn in a subprocess (`uvicorn --factory
asgi_matomo._demo_app:create_app`), configured from the environment. It
combines the documentation's examples (route details with an event,
per-request overrides with a custom variable, `PerfMsTracker`) with a failing
route and a 404.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asgi_matomo._shutdown_report import ReportOnShutdown, stats_report

if TYPE_CHECKING:
    from asgi_matomo._types import ASGIApp

__all__ = [
    "ENV_IDSITE",
    "ENV_STATS",
    "ENV_TOKEN",
    "ENV_URL",
    "HOST",
    "PAGES",
    "REQUESTS",
    "VISITORS",
    "Visit",
    "create_app",
    "traffic",
]

HOST = "127.0.0.1"
FLUSH_INTERVAL = 0.2
# The environment that tells the app in the subprocess where to send its hits.
ENV_URL = "ASGI_MATOMO_DEMO_URL"
ENV_IDSITE = "ASGI_MATOMO_DEMO_IDSITE"
ENV_TOKEN = "ASGI_MATOMO_DEMO_TOKEN"  # noqa: S105 - a variable name, not a token
ENV_STATS = "ASGI_MATOMO_DEMO_STATS"

# Documentation addresses (RFC 5737, RFC 3849): the app sees them behind a
# "proxy" (the demo itself), which the middleware is told to trust.
VISITORS = (
    (
        "203.0.113.10",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "en-US,en;q=0.8",
    ),
    (
        "198.51.100.23",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/126.0.0.0 Safari/537.36",
        "sv-SE,sv;q=0.9,en;q=0.7",
    ),
    (
        "2001:db8::7",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15"
        " (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "de-DE,de;q=0.9",
    ),
    (
        "192.0.2.44",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like"
        " Gecko) Version/17.5 Safari/605.1.15",
        "fr-FR,fr;q=0.9,en;q=0.6",
    ),
    (
        "203.0.113.77",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/126.0.0.0 Mobile Safari/537.36",
        "ja-JP,ja;q=0.9",
    ),
    (
        "198.51.100.5",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
        "es-ES,es;q=0.9",
    ),
)
REFERRERS = (
    None,
    "https://www.google.com/",
    "https://duckduckgo.com/",
    "https://news.ycombinator.com/item?id=4242",
    "https://blog.example.org/asgi-analytics",
)
# (path and query, Matomo hits it makes: a page view, plus one for an event).
PAGES = (
    ("/", 1),
    ("/foo", 2),
    ("/players/ana", 2),
    ("/?utm_source=newsletter&utm_medium=email", 1),
    ("/foo?level=2", 2),
    ("/players/bo?tab=stats", 2),
    ("/does-not-exist", 1),
    ("/", 1),
    ("/fail", 1),
    ("/players/chris", 2),
    ("/health", 0),  # excluded: a load balancer's probe is not a visit
    ("/search?q=asgi+matomo", 1),
)
REQUESTS = 36


@dataclass(frozen=True)
class Visit:
    """One request of the demo's traffic and how many hits Matomo should get from it."""

    path: str
    headers: dict[str, str]
    expected_hits: int


def traffic(count: int = REQUESTS, seed: int = 4) -> list[Visit]:
    """The demo's requests: every page, several visitors, languages and referrers."""
    rng = random.Random(seed)
    pages: list[tuple[str, int]] = []
    while len(pages) < count:
        # Every page once per round, in a different order each round.
        pages += rng.sample(PAGES, len(PAGES))
    visits = []
    for path, hits in pages[:count]:
        ip, user_agent, language = rng.choice(VISITORS)
        headers = {
            "User-Agent": user_agent,
            "Accept-Language": language,
            "X-Forwarded-For": ip,
        }
        referrer = rng.choice(REFERRERS)
        if referrer is not None:
            headers["Referer"] = referrer
        visits.append(Visit(path, headers, hits))
    return visits


# -- the example app (runs in the uvicorn subprocess) -------------------------------


def create_app() -> ASGIApp:
    """The demo's app, configured from the environment (`uvicorn --factory`)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asgi_matomo import MatomoMiddleware
    from asgi_matomo.trackers import PerfMsTracker

    async def fetch_data() -> dict[str, int]:
        await asyncio.sleep(random.uniform(0.005, 0.04))
        return {"data": 4000}

    async def homepage(request: Request) -> JSONResponse:
        # The seed page's third example: time a part of the request.
        with PerfMsTracker(scope=request.scope, key="pf_srv"):
            data = await fetch_data()
        return JSONResponse(data)

    async def foo(request: Request) -> JSONResponse:
        # Renamed, with an event, by `route_details` below (the first example).
        return JSONResponse({"name": "foo"})

    async def player(request: Request) -> JSONResponse:
        # The second example: per-request details, a custom variable among them.
        name = request.path_params["name"]
        request.scope["state"]["asgi_matomo"] = {
            "action_name": "Players/player",
            "e_c": "Players",
            "e_a": "Viewed",
            "e_n": name,
            "cvar": {"player": name},
        }
        return JSONResponse({"player": name})

    async def search(request: Request) -> JSONResponse:
        return JSONResponse({"results": [], "q": request.query_params.get("q", "")})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def fail(request: Request) -> JSONResponse:
        raise RuntimeError("the demo's failing route (tracked as a 500)")

    routes = [
        Route("/", homepage),
        Route("/foo", foo),
        Route("/players/{name}", player),
        Route("/search", search),
        Route("/health", health),
        Route("/fail", fail),
    ]
    tracked = MatomoMiddleware(
        Starlette(routes=routes),
        matomo_url=os.environ[ENV_URL],
        idsite=int(os.environ[ENV_IDSITE]),
        access_token=os.environ.get(ENV_TOKEN) or None,
        # The demo serves plain http on loopback: report the URLs as they are.
        assume_https=False,
        # The demo's traffic comes "through a proxy" on loopback that names the
        # visitor in X-Forwarded-For, like nginx in front of a real app.
        trusted_proxies=[HOST],
        exclude_paths=["/health"],
        route_details={"/foo": {"action_name": "Foo/foo", "e_c": "Foo", "e_a": "Playing"}},
        flush_interval=FLUSH_INTERVAL,
    )
    stats_path = os.environ.get(ENV_STATS)
    if stats_path is None:
        return tracked
    return ReportOnShutdown(tracked, stats_path, lambda: stats_report(tracked.stats))
