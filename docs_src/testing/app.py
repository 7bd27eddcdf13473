"""An app whose Matomo client can be replaced in tests."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware


async def homepage(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def create_app(matomo_client: httpx.AsyncClient | None = None) -> Starlette:
    return Starlette(
        routes=[Route("/", homepage)],
        middleware=[
            Middleware(
                MatomoMiddleware,
                matomo_url="https://matomo.example.org",
                idsite=1,
                client=matomo_client,  # None in production: the middleware makes its own
                exclude_paths=["/health"],
            )
        ],
    )


app = create_app()
