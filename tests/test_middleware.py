"""The middleware at the raw ASGI level and in-process over HTTP."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware, _middleware
from asgi_matomo._types import ASGIApp, Message, Receive, Scope, Send
from asgi_matomo.trackers import PerfMsTracker
from tests.helpers import http_scope

pytestmark = pytest.mark.anyio

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


class Matomo:
    """An in-process Matomo double: records every bulk request and its hits."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        self.urls: list[str] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.urls.append(str(request.url))
        n = len(body["requests"])
        return httpx.Response(self.status, json={"status": "success", "tracked": n, "invalid": 0})

    @property
    def hits(self) -> list[dict[str, str]]:
        return [dict(parse_qsl(item[1:])) for body in self.bodies for item in body["requests"]]


@pytest.fixture
async def matomo() -> AsyncIterator[Matomo]:
    double = Matomo()
    yield double
    await double.client.aclose()


def middleware(app: ASGIApp, matomo: Matomo, **options: Any) -> MatomoMiddleware:
    options.setdefault("matomo_url", "https://matomo.example.org")
    options.setdefault("idsite", 1)
    return MatomoMiddleware(app, client=matomo.client, **options)


async def call(app: ASGIApp, scope: Scope, body: list[Message] | None = None) -> list[Message]:
    """Drive an ASGI app by hand and record what it sends."""
    incoming = list(body or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": b"hel", "more_body": True})
    await send({"type": "http.response.body", "body": b"lo"})


# --- raw ASGI ----------------------------------------------------------------------


async def test_tracks_a_request_and_passes_the_response_through(matomo: Matomo) -> None:
    app = middleware(plain_app, matomo)
    sent = await call(app, http_scope("/hello", query=b"a=1"))
    assert sent == await call(plain_app, http_scope("/hello", query=b"a=1"))
    (hit,) = matomo.hits
    assert hit["url"] == "https://example.org/hello?a=1"
    assert json.loads(hit["cvar"])["1"] == ["http_status_code", "201"]
    assert matomo.urls == ["https://matomo.example.org/matomo.php"]


@pytest.mark.parametrize("scope_type", ["websocket", "unknown"])
async def test_other_scopes_pass_through_untouched(matomo: Matomo, scope_type: str) -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope = {"type": scope_type, "path": "/ws"}
    await middleware(app, matomo)(scope, mock.AsyncMock(), mock.AsyncMock())
    assert seen == [{"type": scope_type, "path": "/ws"}]
    assert matomo.bodies == []


async def test_excluded_requests_are_not_tracked(matomo: Matomo) -> None:
    app = middleware(plain_app, matomo, exclude_paths=["/health"])
    await call(app, http_scope("/health"))
    assert matomo.bodies == []


async def test_app_exception_propagates_and_is_tracked_as_500(matomo: Matomo) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await call(middleware(broken, matomo), http_scope("/boom"))
    (hit,) = matomo.hits
    assert json.loads(hit["cvar"])["1"] == ["http_status_code", "500"]


async def test_exception_after_the_response_started_keeps_the_sent_status(
    matomo: Matomo,
) -> None:
    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("late")

    with pytest.raises(RuntimeError):
        await call(middleware(half, matomo), http_scope("/"))
    assert json.loads(matomo.hits[0]["cvar"])["1"] == ["http_status_code", "200"]


async def test_client_gone_before_any_response_is_499(matomo: Matomo) -> None:
    async def waits(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    await call(middleware(waits, matomo), http_scope("/"))
    assert json.loads(matomo.hits[0]["cvar"])["1"] == ["http_status_code", "499"]


async def test_app_returning_without_a_response_is_500(matomo: Matomo) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return

    await call(middleware(silent, matomo), http_scope("/"))
    assert json.loads(matomo.hits[0]["cvar"])["1"] == ["http_status_code", "500"]


async def test_pathsend_ends_the_response(matomo: Matomo) -> None:
    async def file_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    sent = await call(middleware(file_app, matomo), http_scope("/f"))
    assert sent[-1]["type"] == "http.response.pathsend"
    assert "pf_srv" in matomo.hits[0]


class _Clock:
    """Stands in for the `time` module of the middleware: time moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = time.time()

    def time(self) -> float:
        return self.wall + self.now - 1000.0

    def perf_counter(self) -> float:
        return self.now


async def test_server_time_stops_when_the_app_hands_over_its_answer(
    matomo: Matomo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pf_srv is the app's time: a client slow to read the body (the server's send
    # waiting on flow control) must not show up in it.
    clock = _Clock()
    monkeypatch.setattr(_middleware, "time", clock)

    async def working_app(scope: Scope, receive: Receive, send: Send) -> None:
        clock.now += 0.25  # the handler's own work
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        clock.now += 0.5  # more work between the parts
        await send({"type": "http.response.body", "body": b"y"})

    async def slow_client_send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            clock.now += 5.0  # the last part waits for the client to read

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    app = middleware(working_app, matomo)
    await app(http_scope("/slow-reader"), receive, slow_client_send)
    assert clock.now == 1005.75
    assert matomo.hits[0]["pf_srv"] == "750"


async def test_state_dict_replaced_or_mutated_both_work(matomo: Matomo) -> None:
    async def replaces(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["asgi_matomo"] = {"action_name": "Replaced", "cvar": {"k": "v"}}
        await plain_app(scope, receive, send)

    async def mutates(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["asgi_matomo"]["action_name"] = "Mutated"
        await plain_app(scope, receive, send)

    async def breaks_it(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = "not a dict"
        await plain_app(scope, receive, send)

    await call(middleware(replaces, matomo), http_scope("/a"))
    await call(middleware(mutates, matomo), http_scope("/b"))
    await call(middleware(breaks_it, matomo), http_scope("/c"))
    replaced, mutated, broken = matomo.hits
    assert replaced["action_name"] == "Replaced"
    assert json.loads(replaced["cvar"])["3"] == ["k", "v"]
    assert mutated["action_name"] == "Mutated"
    assert broken["action_name"] == "/c"


async def test_inherited_state_is_copied_not_shared(matomo: Matomo) -> None:
    app_state: dict[str, Any] = {"asgi_matomo": {"uid": "from-app"}}

    async def mutates(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["asgi_matomo"]["action_name"] = scope["path"]
        await plain_app(scope, receive, send)

    app = middleware(mutates, matomo)
    for path in ("/one", "/two"):
        scope = http_scope(path)
        scope["state"] = dict(app_state)  # what servers do per request: a shallow copy
        await call(app, scope)
    assert app_state == {"asgi_matomo": {"uid": "from-app"}}
    assert [(h["uid"], h["action_name"]) for h in matomo.hits] == [
        ("from-app", "/one"),
        ("from-app", "/two"),
    ]


async def test_non_mapping_state_is_left_alone(matomo: Matomo) -> None:
    scope = http_scope("/")
    scope["state"] = ["odd"]
    await call(middleware(plain_app, matomo), scope)
    assert scope["state"] == ["odd"]
    assert len(matomo.hits) == 1


async def test_a_failing_core_never_breaks_the_request(
    matomo: Matomo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in tracking")

    app = middleware(plain_app, matomo)
    monkeypatch.setattr("asgi_matomo._middleware.build_hits", explode)
    sent = await call(app, http_scope("/"))
    assert sent[0]["status"] == 201
    monkeypatch.setattr("asgi_matomo._middleware.inspect_request", explode)
    sent = await call(app, http_scope("/"))
    assert sent[0]["status"] == 201
    assert matomo.bodies == []


async def test_perf_ms_tracker_in_a_raw_app(matomo: Matomo) -> None:
    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        async with PerfMsTracker(scope=scope, key="pf_srv"):
            pass
        with PerfMsTracker(scope=scope, key="pf_net"):
            pass
        await plain_app(scope, receive, send)

    await call(middleware(timed, matomo), http_scope("/"))
    (hit,) = matomo.hits
    assert hit["pf_srv"].isdigit()
    assert hit["pf_net"].isdigit()


# --- lifespan ----------------------------------------------------------------------


def starlette_app(**options: Any) -> tuple[Starlette, list[str]]:
    events: list[str] = []

    async def home(request: Request) -> Response:
        return PlainTextResponse("home")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(routes=[Route("/", home)], lifespan=lifespan)
    app.add_middleware(MatomoMiddleware, **options)
    return app, events


async def test_lifespan_runs_the_background_sender(matomo: Matomo) -> None:
    app, events = starlette_app(
        matomo_url="http://m.example", idsite=1, client=matomo.client, batch_size=3
    )
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(5):
                assert (await client.get("/")).text == "home"
    assert events == ["startup", "shutdown"]
    # 5 hits with batch_size 3: a full batch, then the rest flushed at shutdown.
    assert [len(body["requests"]) for body in matomo.bodies] == [3, 2]
    stack = app.middleware_stack
    assert isinstance(stack, MatomoMiddleware) or stack is not None


async def test_lifespan_twice_on_one_app(matomo: Matomo) -> None:
    app, _ = starlette_app(matomo_url="http://m.example", idsite=1, client=matomo.client)
    for _ in range(2):
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await client.get("/")
    assert len(matomo.hits) == 2


async def lifespan_events(app: ASGIApp) -> list[Message]:
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


async def no_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        raise RuntimeError("this app only speaks http")
    await plain_app(scope, receive, send)


async def ignores_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await plain_app(scope, receive, send)


async def receives_then_fails(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    raise RuntimeError("no lifespan here")


@pytest.mark.parametrize("app", [no_lifespan, ignores_lifespan])
async def test_apps_without_lifespan_still_get_a_sender(matomo: Matomo, app: ASGIApp) -> None:
    wrapped = middleware(app, matomo)
    sent = await lifespan_events(wrapped)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_an_exception_after_the_startup_event_is_a_failed_startup(matomo: Matomo) -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    with pytest.raises(RuntimeError, match="no lifespan here"):
        await middleware(receives_then_fails, matomo)({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "no lifespan here" in sent[0]["message"]


async def test_startup_failure_is_forwarded(matomo: Matomo) -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "db down"})
        raise RuntimeError("db down")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    with pytest.raises(RuntimeError, match="db down"):
        await middleware(fails, matomo)({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": "db down"}]


async def test_app_that_finishes_lifespan_normally(matomo: Matomo) -> None:
    async def polite(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    sent = await lifespan_events(middleware(polite, matomo))
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


# --- in-process HTTP: Starlette and FastAPI ---------------------------------------


async def test_documented_testing_pattern_with_a_mock_client() -> None:
    matomo_client = mock.AsyncMock(httpx.AsyncClient)
    matomo_client.post = mock.AsyncMock(return_value=mock.Mock(status_code=204, text=""))
    app = Starlette()
    app.add_middleware(
        MatomoMiddleware, client=matomo_client, matomo_url="http://trackingserver", idsite=12345
    )

    def foo(request: Request) -> PlainTextResponse:
        return PlainTextResponse("foo")

    app.add_route("/foo", foo)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/foo")
    assert response.status_code == 200
    matomo_client.post.assert_awaited()
    url = matomo_client.post.await_args.args[0]
    assert url == "http://trackingserver/matomo.php"


async def test_streaming_response_is_timed_to_the_last_chunk(matomo: Matomo) -> None:
    async def chunks() -> Any:
        for part in (b"a", b"b", b"c"):
            yield part

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/s", stream)])
    wrapped = middleware(app, matomo)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/s")).content == b"abc"
    (hit,) = matomo.hits
    assert hit["pf_srv"].isdigit()


async def test_fastapi_route_templates_and_prefixes(matomo: Matomo) -> None:
    from fastapi import APIRouter, FastAPI

    router = APIRouter(prefix="/users")

    @router.get("/{user_id}")
    async def show(user_id: int, request: Request) -> dict[str, int]:
        request.state.asgi_matomo = {"uid": f"user-{user_id}"}
        return {"id": user_id}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(
        MatomoMiddleware,
        matomo_url="http://m.example",
        idsite=1,
        client=matomo.client,
        action_name_from_route=True,
        route_details={"/users/{user_id}": {"dimension1": "users"}},
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/users/7")).json() == {"id": 7}
        assert (await client.get("/nowhere")).status_code == 404
    show_hit, missing = matomo.hits
    assert show_hit["action_name"] == "/users/{user_id}"
    assert show_hit["url"] == "https://t/users/7"
    assert show_hit["uid"] == "user-7"
    assert show_hit["dimension1"] == "users"
    assert json.loads(missing["cvar"])["1"] == ["http_status_code", "404"]
    assert missing["action_name"] == "(not found)"
    assert missing["url"] == "https://t/nowhere"


async def test_token_only_in_the_body_never_in_urls_or_logs(
    matomo: Matomo, caplog: pytest.LogCaptureFixture
) -> None:
    app = middleware(plain_app, matomo, access_token=TOKEN)
    with caplog.at_level(logging.DEBUG):
        await call(app, http_scope("/", client=("198.51.100.4", 1)))
    (body,) = matomo.bodies
    assert body["token_auth"] == TOKEN
    assert TOKEN not in "".join(body["requests"])
    assert all(TOKEN not in url for url in matomo.urls)
    assert TOKEN not in caplog.text
    assert matomo.hits[0]["cip"] == "198.51.100.4"


async def test_stats_are_exposed(matomo: Matomo) -> None:
    app = middleware(plain_app, matomo)
    await call(app, http_scope("/"))
    assert app.stats.sent == 1


# --- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"matomo_url": ""}, ValueError, "matomo_url"),
        ({"matomo_url": "ftp://x"}, ValueError, "matomo_url"),
        ({"matomo_url": 5}, TypeError, "matomo_url"),
        ({"matomo_url": "https://m.example/matomo.php?token_auth=x"}, ValueError, "access_token"),
        ({"idsite": 0}, ValueError, "idsite"),
        ({"idsite": "abc"}, ValueError, "idsite"),
        ({"idsite": 1.5}, TypeError, "idsite"),
        ({"idsite": True}, TypeError, "idsite"),
        ({"access_token": ""}, ValueError, "access_token"),
        ({"access_token": "a b"}, ValueError, "access_token"),
        ({"access_token": 5}, TypeError, "access_token"),
        ({"client": object()}, TypeError, "client"),
        ({"http_timeout": 0}, ValueError, "http_timeout"),
        ({"http_timeout": "5"}, TypeError, "http_timeout"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"flush_interval": -1}, ValueError, "flush_interval"),
        ({"exclude_paths": "/health"}, TypeError, "exclude_paths"),
        ({"exclude_paths": [1]}, TypeError, "exclude_paths"),
        ({"exclude_patterns": ["("]}, ValueError, "exclude_patterns"),
        ({"exclude_patterns": [1]}, TypeError, "exclude_patterns"),
        ({"exclude_patterns": "x"}, TypeError, "exclude_patterns"),
        ({"allowed_methods": "GET"}, ValueError, "allowed_methods"),
        ({"allowed_methods": ["GETT"]}, ValueError, "allowed_methods"),
        ({"ignored_methods": ["FETCH"]}, ValueError, "ignored_methods"),
        ({"ignored_user_agents": ["["]}, ValueError, "ignored_user_agents"),
        ({"route_details": []}, TypeError, "route_details"),
        ({"route_details": {"foo": {}}}, ValueError, "route_details"),
        ({"route_details": {"/foo": "x"}}, TypeError, "route_details"),
        ({"route_details": {"/foo": {1: "x"}}}, TypeError, "route_details"),
        ({"route_details": {"/foo": {"token_auth": "x"}}}, ValueError, "route_details"),
        ({"route_details": {"/foo": {"cvar": "x"}}}, TypeError, "route_details"),
        ({"route_details": {"/foo": {"e_c": "C"}}}, ValueError, "e_a"),
        ({"custom_dimensions": []}, TypeError, "custom_dimensions"),
        ({"custom_dimensions": {"a": 0}}, ValueError, "custom_dimensions"),
        ({"custom_dimensions": {"": 1}}, TypeError, "custom_dimensions"),
        ({"trusted_proxies": ["10.0.0.300"]}, ValueError, "trusted_proxies"),
        ({"trusted_proxies": [5]}, TypeError, "trusted_proxies"),
        ({"trusted_proxies": 5}, TypeError, "trusted_proxies"),
        ({"anonymize_ip_bytes": 4}, ValueError, "anonymize_ip_bytes"),
        ({"assume_https": "yes"}, TypeError, "assume_https"),
        ({"action_name_from_route": 1}, TypeError, "action_name_from_route"),
        ({"spool_path": 5}, TypeError, "spool_path"),
        ({"spool_path": ""}, ValueError, "spool_path"),
        ({"spool_path": ":memory:"}, ValueError, "spool_path"),
        ({"spool_path": "/"}, ValueError, "spool_path '/' is a directory"),
    ],
)
def test_bad_options_are_clear_errors(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    kwargs: dict[str, Any] = {"matomo_url": "https://m.example", "idsite": 1, **options}
    with pytest.raises(error, match=match):
        MatomoMiddleware(plain_app, **kwargs)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("https://m.example", "https://m.example/matomo.php"),
        ("https://m.example/", "https://m.example/matomo.php"),
        ("https://m.example/analytics/", "https://m.example/analytics/matomo.php"),
        ("https://m.example/matomo.php", "https://m.example/matomo.php"),
        ("https://m.example/piwik.php", "https://m.example/piwik.php"),
        (" http://127.0.0.1:8765 ", "http://127.0.0.1:8765/matomo.php"),
    ],
)
def test_matomo_url_with_or_without_the_script(url: str, endpoint: str) -> None:
    from asgi_matomo._config import tracking_endpoint

    assert tracking_endpoint(url) == endpoint


def test_idsite_as_digits_and_methods_any_case() -> None:
    app = MatomoMiddleware(
        plain_app,
        matomo_url="https://m.example",
        idsite="7",  # type: ignore[arg-type]  # settings read from the environment
        allowed_methods=["get"],
    )
    assert app._config.idsite == 7
    assert app._config.allowed_methods == frozenset({"GET"})


def test_spool_path_opens_at_startup(tmp_path: Any) -> None:
    app = MatomoMiddleware(
        plain_app, matomo_url="https://m.example", idsite=1, spool_path=tmp_path / "s.sqlite"
    )
    assert (tmp_path / "s.sqlite").exists()
    assert app.stats.spooled == 0


def test_an_unusable_spool_file_does_not_stop_the_app(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "s.sqlite").write_bytes(b"not a database" * 100)
    (tmp_path / "foreign.sqlite").write_bytes(b"")
    conn = sqlite3.connect(tmp_path / "foreign.sqlite")
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    for name in ("s.sqlite", "foreign.sqlite"):
        MatomoMiddleware(
            plain_app, matomo_url="https://m.example", idsite=1, spool_path=tmp_path / name
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "is corrupt" in errors[0]
    assert "not an asgi-matomo spool" in errors[1]


_: Callable[..., Awaitable[None]] = plain_app


async def test_a_cancelled_request_is_still_queued(matomo: Matomo) -> None:
    started = anyio.Event()

    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await anyio.sleep_forever()

    app = middleware(hangs, matomo)
    async with app._sender.running_in_background():
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, app, http_scope("/slow"))
            await started.wait()
            tg.cancel_scope.cancel()
        assert app.stats.queued == 1
    (hit,) = matomo.hits
    assert json.loads(hit["cvar"])["1"] == ["http_status_code", "200"]


async def test_a_cancelled_request_without_a_sender_is_not_awaited(matomo: Matomo) -> None:
    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    app = middleware(hangs, matomo)
    with anyio.move_on_after(0.01):
        await call(app, http_scope("/"))
    assert matomo.bodies == []
    assert app.stats.dropped == 1
