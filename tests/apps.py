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
from collections.abc import Callable
from typing import Any

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
