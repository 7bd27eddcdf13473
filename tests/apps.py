"""Apps that the real-server tests serve, configured through the environment.

`uvicorn --factory tests.apps:from_env` (or hypercorn's `tests.apps:from_env()`)
imports the app named by ASGI_MATOMO_APP (`module:attribute`) and points its
MatomoMiddleware at ASGI_MATOMO_URL: the documentation's examples keep their
placeholder URL exactly as the docs show it, and the test swaps in the local
stand-in. ASGI_MATOMO_OPTIONS (JSON) adds middleware options.
"""

from __future__ import annotations

import importlib
import json
import os
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


def from_env() -> ASGIApp:
    module_name, _, attribute = os.environ["ASGI_MATOMO_APP"].partition(":")
    app: Any = getattr(importlib.import_module(module_name), attribute or "app")
    options = json.loads(os.environ.get("ASGI_MATOMO_OPTIONS", "{}"))
    point_at(app, os.environ["ASGI_MATOMO_URL"], options)
    return app  # type: ignore[no-any-return]
