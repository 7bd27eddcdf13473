"""The app the delivery tests serve: numbered requests, and the sender's counters."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware


async def numbered(request: Request) -> Response:
    return PlainTextResponse(f"hello {request.query_params.get('n', '')}")


def _matomo(app: Any) -> MatomoMiddleware:
    """The middleware instance in Starlette's built stack."""
    while not isinstance(app, MatomoMiddleware):
        app = app.app
    return app


async def stats(request: Request) -> Response:
    return JSONResponse(dataclasses.asdict(_matomo(request.app.middleware_stack).stats))


app = Starlette(
    routes=[Route("/", numbered), Route("/stats", stats)],
    middleware=[
        Middleware(
            MatomoMiddleware,
            matomo_url="http://matomo.invalid",
            idsite=1,
            exclude_paths=["/stats"],
        )
    ],
)
