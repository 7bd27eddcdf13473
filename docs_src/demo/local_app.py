"""An app that sends its hits to the local collector while you develop it."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware


async def homepage(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


app = Starlette(
    routes=[Route("/", homepage)],
    middleware=[
        Middleware(
            MatomoMiddleware,
            # `asgi-matomo collector` listens here; production sets the real one.
            matomo_url=os.environ.get("MATOMO_URL", "http://127.0.0.1:8765"),
            idsite=int(os.environ.get("MATOMO_IDSITE", "1")),
            access_token=os.environ.get("MATOMO_TOKEN"),
            assume_https=False,  # the app runs on plain http locally
            flush_interval=0.2,  # see hits on the page at once
        )
    ],
)
