"""The Quart and Django adapters hand the matched route to the middleware.

Served by real servers in tests/test_frameworks.py (the documented examples use
them); here, what they do with each kind of request, and that importing the
library imports no framework.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import pytest
from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from quart import Quart, request

from asgi_matomo._collector import Collector
from asgi_matomo._routes import route_template
from asgi_matomo.contrib.django import MatomoRouteMiddleware
from asgi_matomo.contrib.quart import add_route_templates
from tests.servers import serve


def test_importing_the_library_imports_no_framework() -> None:
    code = (
        "import sys, asgi_matomo, asgi_matomo.trackers, asgi_matomo.testing;"
        "loaded = {'quart', 'django', 'flask', 'asgi_matomo.contrib'} & set(sys.modules);"
        "print(sorted(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- Django ---------------------------------------------------------------------------------


def django_request(scope: dict[str, Any] | None, route: str | None) -> HttpRequest:
    """What the adapter reads of Django's request: `scope`, and the match once resolved."""
    match = SimpleNamespace(route=route) if route is not None else None
    fake = SimpleNamespace(resolver_match=match)
    if scope is not None:
        fake.scope = scope
    return cast(HttpRequest, fake)


RESPONSE = HttpResponse.__new__(HttpResponse)  # no settings needed: never rendered


def test_django_adapter_in_sync_mode() -> None:
    def view(request: HttpRequest) -> HttpResponseBase:
        return RESPONSE

    middleware = MatomoRouteMiddleware(view)
    scope: dict[str, Any] = {"type": "http", "root_path": ""}
    assert middleware(django_request(scope, "users/<int:user_id>")) is RESPONSE
    assert route_template(scope) == "/users/<int:user_id>"


def test_django_adapter_in_async_mode() -> None:
    async def view(request: HttpRequest) -> HttpResponseBase:
        return RESPONSE

    middleware = MatomoRouteMiddleware(view)
    scope: dict[str, Any] = {"type": "http", "root_path": "/app"}

    async def main() -> HttpResponseBase:
        # Django awaits a middleware marked as a coroutine function.
        assert iscoroutinefunction(middleware)
        return await cast(Awaitable[HttpResponseBase], middleware(django_request(scope, "a/")))

    assert anyio.run(main) is RESPONSE
    assert route_template(scope) == "/app/a/"


@pytest.mark.parametrize(
    ("scope", "route"),
    [(None, "users/"), ({"type": "http"}, None)],
    ids=["wsgi-no-scope", "not-resolved"],
)
def test_django_adapter_without_a_scope_or_a_match(
    scope: dict[str, Any] | None, route: str | None
) -> None:
    middleware = MatomoRouteMiddleware(lambda request: RESPONSE)
    assert middleware(django_request(scope, route)) is RESPONSE
    assert scope is None or "route" not in scope


# --- Quart ----------------------------------------------------------------------------------


def test_quart_adapter_stores_the_rule_of_each_request() -> None:
    app = add_route_templates(Quart(__name__))
    assert add_route_templates(app) is app  # a second call adds nothing
    assert len(app.before_request_funcs[None]) == 1

    @app.get("/users/<int:user_id>")
    async def user(user_id: int) -> str:
        return str(cast(dict[str, Any], request.scope).get("route"))

    async def main() -> tuple[str, int]:
        client = app.test_client()
        found = await client.get("/users/7")
        missing = await client.get("/nowhere")
        return await found.get_data(as_text=True), missing.status_code

    assert anyio.run(main) == ("/users/<int:user_id>", 404)


def test_quart_hook_runs_before_the_apps_own_hooks() -> None:
    app = Quart(__name__)

    @app.before_request
    async def earlier() -> None:
        pass

    add_route_templates(app)

    @app.before_request
    async def later() -> None:
        pass

    hooks = app.before_request_funcs[None]
    assert [hook.__name__ for hook in hooks] == ["_store_route", "earlier", "later"]
    add_route_templates(app)  # again: still once, still first
    assert [hook.__name__ for hook in hooks] == ["_store_route", "earlier", "later"]


@pytest.mark.slow
def test_quart_hooks_that_answer_early_keep_the_route_template(tmp_path: Path) -> None:
    """Under uvicorn: a before_request hook returns a response before the handler runs."""
    checks = {
        "/closed/today": (503, "/closed/<name>"),  # an app hook registered before
        "/shop/items/3": (401, "/shop/items/<int:item_id>"),  # a blueprint's hook
        "/open/late": (409, "/open/<name>"),  # an app hook registered after
        "/open/door": (200, "/open/<name>"),
    }
    options = {"action_name_from_route": True}
    with (
        Collector() as collector,
        serve(
            "tests.quart_hooks_app:app", collector.tracking_url, tmp_path, options=options
        ) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for path, (status, _) in checks.items():
            assert client.get(path).status_code == status, path
        hits = {httpx.URL(hit.url or "").path: hit for hit in collector.wait_for_hits(len(checks))}
    assert {path: (hit.http_status, hit.action_name) for path, hit in hits.items()} == checks
