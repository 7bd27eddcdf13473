"""An app whose handlers write to the per-request dict in every documented way.

Served by a real uvicorn in tests/test_visitors.py: the mutating form must work on
requests that are not tracked (an excluded path, a bot, an ignored method) as
well as on tracked ones, and `set_tracking_params` from a sync endpoint that
Starlette runs in a thread pool.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware, set_tracking_params

METHODS = ["GET", "POST", "OPTIONS", "DELETE"]


async def mutate(request: Request) -> Response:
    params = request.scope["state"]["asgi_matomo"]
    params["uid"] = "user-1"
    params.update({"dimension1": "updated"})
    request.scope["state"]["asgi_matomo"]["cvar"] = {"plan": "pro"}
    return JSONResponse(
        {"method": request.method, "path": request.url.path, "keys": sorted(params)},
        headers={"x-app": "state"},
    )


def sync(request: Request) -> Response:
    # No scope needed: the context variable reaches this worker thread.
    found = set_tracking_params(uid="sync-user")
    return JSONResponse({"found": found})


async def plain(request: Request) -> Response:
    return JSONResponse({"path": request.url.path})


# /late starts a task that sets a parameter once /release lets it: after the
# response of /late has ended and its hit was built.
_late: list[tuple[asyncio.Task[bool], asyncio.Event]] = []


async def late(request: Request) -> Response:
    released = asyncio.Event()

    async def set_later() -> bool:
        await released.wait()
        return set_tracking_params(dimension2="too late")

    _late.append((asyncio.create_task(set_later()), released))
    return JSONResponse({"found": set_tracking_params(dimension1="in time")})


async def release(request: Request) -> Response:
    task, released = _late.pop()
    released.set()
    return JSONResponse({"found": await task})


app = Starlette(
    routes=[
        Route("/sync", sync),
        Route("/plain", plain),
        Route("/late", late),
        Route("/release", release),
        Route("/{path:path}", mutate, methods=METHODS),
    ],
    middleware=[
        Middleware(
            MatomoMiddleware,
            matomo_url="http://matomo.invalid",
            idsite=1,
            exclude_paths=["/health"],
            ignored_user_agents=["(?i)bot"],
            ignored_methods=["OPTIONS", "DELETE"],
        )
    ],
)
