"""Small helpers shared by the test modules."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import httpx

from asgi_matomo._config import DEFAULT_IGNORED_METHODS, build_config
from asgi_matomo._hit import Hit
from asgi_matomo._request import TrackingConfig
from asgi_matomo._types import Message


class FakeClock:
    """A clock that moves only when the test sets `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class BulkRecorder:
    """The smallest client the sender accepts: records each bulk body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        self.received.append(json.loads(kwargs["content"]))
        return httpx.Response(204)


async def call_app(app: Any, scope: dict[str, Any]) -> list[Message]:
    """Everything `app` sends for one bodiless request."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def params_of(hit: Hit, *, authenticated: bool = True) -> dict[str, str]:
    """A hit's parameters exactly as Matomo decodes them."""
    return dict(parse_qsl(hit.encode(authenticated=authenticated)[1:], keep_blank_values=True))


def config(**options: Any) -> TrackingConfig:
    """A tracking config with the middleware's defaults, overridable per test.

    But for visitor ids: off unless a test asks (`visitor_ids=True`), so that
    hits carry no `cid` that depends on the key.
    """
    defaults: dict[str, Any] = {
        "idsite": 1,
        "track_visitor_ip": False,
        "assume_https": True,
        "exclude_paths": None,
        "exclude_patterns": None,
        "allowed_methods": "all-methods",
        "ignored_methods": DEFAULT_IGNORED_METHODS,
        "ignored_user_agents": None,
        "route_details": None,
        "action_name_from_route": False,
        "custom_dimensions": None,
        "trusted_proxies": None,
        "anonymize_ip_bytes": 0,
    }
    defaults.update(options)
    return build_config(**defaults)


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] | None = ("203.0.113.7", 50000),
    server: tuple[str, int | None] | None = ("127.0.0.1", 8000),
    root_path: str = "",
    raw_path: bytes | None = None,
    scheme: str = "http",
) -> dict[str, Any]:
    """A raw ASGI HTTP scope as a server would build it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": raw_path,
        "root_path": root_path,
        "query_string": query,
        "headers": headers if headers is not None else [(b"host", b"example.org")],
        "client": client,
        "server": server,
    }
