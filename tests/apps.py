"""Apps that the real-server tests serve, configured through the environment.

`uvicorn --factory tests.apps:from_env` (or hypercorn's `tests.apps:from_env()`)
imports the app named by ASGI_MATOMO_APP (`module:attribute`) and points its
MatomoMiddleware at ASGI_MATOMO_URL: the documentation's examples keep their
placeholder URL exactly as the docs show it, and the test swaps in the local
stand-in. ASGI_MATOMO_OPTIONS (JSON) adds middleware options.

Starlette and FastAPI apps keep their middleware list (`user_middleware`), which
`point_at` rewrites. Every other app (Litestar, Quart, Django, a raw ASGI app)
builds its MatomoMiddleware when its module is imported or its app is built, so
`from_env` first makes every MatomoMiddleware this server process creates use
the test's URL and options (`redirect_all`).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware
from asgi_matomo._types import ASGIApp


def point_at(app: Any, url: str, options: dict[str, Any]) -> None:
    """Rewrite the MatomoMiddleware options of a Starlette/FastAPI app before it starts."""
    found = False
    for middleware in getattr(app, "user_middleware", []):
        if middleware.cls is MatomoMiddleware:
            middleware.kwargs["matomo_url"] = url
            middleware.kwargs.update(options)
            found = True
    if not found:
        raise LookupError("the app has no MatomoMiddleware to point at the test server")


def redirect_all(url: str, options: dict[str, Any]) -> None:
    """Make every MatomoMiddleware created from now on in this process use `url` and `options`.

    Only for the server subprocesses the tests start: the examples stay exactly
    as the docs show them, placeholder URL included.
    """
    original: Callable[..., None] = MatomoMiddleware.__init__
    if getattr(original, "redirected", False):
        return

    @functools.wraps(original)
    def init(self: MatomoMiddleware, app: ASGIApp, **kwargs: Any) -> None:
        original(self, app, **{**kwargs, "matomo_url": url, **options})

    init.redirected = True  # type: ignore[attr-defined]
    setattr(MatomoMiddleware, "__init__", init)  # noqa: B010 - mypy refuses a method assignment


def from_env() -> ASGIApp:
    module_name, _, attribute = os.environ["ASGI_MATOMO_APP"].partition(":")
    url = os.environ["ASGI_MATOMO_URL"]
    options = json.loads(os.environ.get("ASGI_MATOMO_OPTIONS", "{}"))
    redirect_all(url, options)
    app: Any = getattr(importlib.import_module(module_name), attribute or "app")
    if hasattr(app, "user_middleware"):
        point_at(app, url, options)
    return app  # type: ignore[no-any-return]


# --- an app with every kind of response the server tests need -----------------


async def _plain(request: Request) -> Response:
    # The client's port tells the test which connection served the request.
    client = request.scope.get("client") or ("", 0)
    return PlainTextResponse(f"{client[0]} {client[1]}")


async def _pid(request: Request) -> Response:
    """Which worker process served the request."""
    return PlainTextResponse(str(os.getpid()))


async def _stream(request: Request) -> Response:
    chunks = int(request.query_params.get("chunks", "5"))

    async def body() -> AsyncIterator[bytes]:
        for index in range(chunks):
            await anyio.sleep(0.02)
            yield b"chunk %d\n" % index

    return StreamingResponse(body(), media_type="text/plain")


async def _file(request: Request) -> Response:
    pathsend = "http.response.pathsend" in request.scope.get("extensions", {})
    return FileResponse(__file__, headers={"x-pathsend": str(int(pathsend))})


async def _endless(request: Request) -> Response:
    """Streams until the client goes away (bounded, so a broken test cannot hang)."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(ENDLESS_CHUNKS):
            yield b"x" * 1024
            await anyio.sleep(0.01)

    return StreamingResponse(body(), media_type="text/plain")


async def _wait_for_disconnect(request: Request) -> Response:
    """Answers only once the client is gone: the answer reaches nobody."""
    with anyio.move_on_after(ENDLESS_CHUNKS * 0.01):
        while not await request.is_disconnected():
            await anyio.sleep(0.01)
    return PlainTextResponse("too late")


ENDLESS_CHUNKS = 3000
server_app = Starlette(
    routes=[
        Route("/", _plain),
        Route("/pid", _pid),
        Route("/stream", _stream),
        Route("/file", _file),
        Route("/endless", _endless),
        Route("/wait-for-disconnect", _wait_for_disconnect),
    ],
    middleware=[Middleware(MatomoMiddleware, matomo_url="http://matomo.invalid", idsite=1)],
)
