"""The per-request dict on every request, set_tracking_params, and the app's own functions."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware, _overrides, set_tracking_params
from asgi_matomo._collector import Collector
from asgi_matomo._types import ASGIApp, Receive, Scope, Send
from asgi_matomo._visitor import VisitorIds
from asgi_matomo.testing import MatomoRecorder
from tests.helpers import call_app, http_scope
from tests.servers import serve

pytestmark = pytest.mark.anyio

KEY = "a test key, not a secret"
BOT = b"Googlebot/2.1"


@pytest.fixture
async def recorder() -> AsyncIterator[MatomoRecorder]:
    double = MatomoRecorder()
    yield double
    await double.aclose()


def tracked(app: ASGIApp, recorder: MatomoRecorder, **options: Any) -> MatomoMiddleware:
    options.setdefault("matomo_url", "https://matomo.example.org")
    options.setdefault("idsite", 1)
    options.setdefault("visitor_key", KEY)
    return MatomoMiddleware(app, client=recorder.client, **options)


async def mutating_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Writes to the dict in every documented way, then answers what it found there."""
    scope["state"]["asgi_matomo"]["uid"] = "user-1"
    scope["state"]["asgi_matomo"].update({"dimension1": "a", "action_name": "Mutated"})
    found = set_tracking_params(dimension2="b")
    body = json.dumps({"keys": sorted(scope["state"]["asgi_matomo"]), "found": found}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": body})


EXPECTED = [
    {"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]},
    {
        "type": "http.response.body",
        "body": b'{"keys": ["action_name", "dimension1", "dimension2", "uid"], "found": true}',
    },
]


# -- the dict exists on every request ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "headers", "state", "is_tracked"),
    [
        ("/health", "GET", [], None, False),
        ("/", "GET", [(b"user-agent", BOT)], None, False),
        ("/", "OPTIONS", [], None, False),
        ("/", "DELETE", [], None, False),
        ("/", "GET", [], {"asgi_matomo": "not a dict"}, True),
    ],
    ids=["excluded-path", "ignored-user-agent", "options", "ignored-method", "odd-state"],
)
async def test_untracked_requests_have_the_dict_too(
    path: str,
    method: str,
    headers: list[tuple[bytes, bytes]],
    state: dict[str, Any] | None,
    is_tracked: bool,
    recorder: MatomoRecorder,
) -> None:
    app = tracked(
        mutating_app,
        recorder,
        exclude_paths=["/health"],
        ignored_user_agents=["bot"],
        ignored_methods=["OPTIONS", "DELETE"],
    )
    scope = http_scope(path, method=method, headers=headers)
    if state is not None:
        scope["state"] = state
    assert await call_app(app, scope) == EXPECTED
    assert len(recorder.hits) == int(is_tracked)


async def test_a_tracked_request_sends_what_the_handler_wrote(recorder: MatomoRecorder) -> None:
    assert await call_app(tracked(mutating_app, recorder), http_scope("/")) == EXPECTED
    (hit,) = recorder.hits
    assert hit["uid"] == "user-1"
    assert (hit["dimension1"], hit["dimension2"], hit["action_name"]) == ("a", "b", "Mutated")
    assert "cid" not in hit  # the uid names the visitor


async def test_the_dict_is_fresh_for_each_request(recorder: MatomoRecorder) -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(scope["state"]["asgi_matomo"]))
        scope["state"]["asgi_matomo"]["uid"] = "leaks?"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = tracked(app, recorder, exclude_paths=["/x"])
    app_state: dict[str, Any] = {"asgi_matomo": {"dimension9": "app-wide"}}
    for path in ("/", "/x", "/", "/x"):
        # What servers do with the lifespan state: a shallow copy per request.
        await call_app(middleware, {**http_scope(path), "state": dict(app_state)})
    assert seen == [{"dimension9": "app-wide"}] * 4
    assert app_state == {"asgi_matomo": {"dimension9": "app-wide"}}


# -- set_tracking_params ----------------------------------------------------------------


def test_set_tracking_params_outside_a_request_does_nothing() -> None:
    assert set_tracking_params(uid="nobody") is False
    assert set_tracking_params({"uid": "nobody"}) is False


async def test_set_tracking_params_is_a_no_op_again_after_the_request(
    recorder: MatomoRecorder,
) -> None:
    await call_app(tracked(mutating_app, recorder), http_scope("/"))
    assert set_tracking_params(uid="after") is False
    with pytest.raises(RuntimeError):
        await call_app(tracked(failing_app, recorder), http_scope("/"))
    assert set_tracking_params(uid="after") is False


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    set_tracking_params(uid="before the error")
    raise RuntimeError("boom")


async def test_set_tracking_params_merges_custom_variables_and_follows_a_replaced_dict(
    recorder: MatomoRecorder,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["asgi_matomo"] = {"cvar": {"plan": "free"}}
        set_tracking_params({"cvar": {"team": "red"}}, e_c="Cat", e_a="Act")
        set_tracking_params(cvar={"plan": "pro"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await call_app(tracked(app, recorder), http_scope("/"))
    page, event = recorder.hits
    assert json.loads(page["cvar"]) == {
        "1": ["http_status_code", "200"],
        "2": ["http_method", "GET"],
        "3": ["plan", "pro"],
        "4": ["team", "red"],
    }
    assert (event["e_c"], event["e_a"]) == ("Cat", "Act")


async def test_set_tracking_params_repairs_a_dict_the_handler_broke(
    recorder: MatomoRecorder,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["asgi_matomo"] = None
        set_tracking_params(uid="u-2")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await call_app(tracked(app, recorder), http_scope("/"))
    assert recorder.hits[0]["uid"] == "u-2"


def record_user(user: str) -> None:
    """Code far from the request: no scope in sight."""
    set_tracking_params(uid=user, dimension4="deep")


async def async_endpoint(request: Request) -> JSONResponse:
    record_user("async-user")
    return JSONResponse({"ok": True})


def sync_endpoint(request: Request) -> JSONResponse:
    # Starlette runs this in a worker thread, with a copy of the request's context.
    record_user("sync-user")
    return JSONResponse({"ok": True})


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_set_tracking_params_from_async_code_and_from_a_thread_pool(
    recorder: MatomoRecorder,
) -> None:
    app = Starlette(
        routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)],
        middleware=[
            Middleware(
                MatomoMiddleware,
                matomo_url="https://matomo.example.org",
                idsite=1,
                client=recorder.client,
                flush_interval=0.05,
                visitor_key=KEY,
            )
        ],
    )
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for path in ("/async", "/sync"):
                assert (await client.get(path)).json() == {"ok": True}
            hits = await recorder.wait_for(2)
    assert sorted((hit["uid"], hit["dimension4"]) for hit in hits) == [
        ("async-user", "deep"),
        ("sync-user", "deep"),
    ]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_set_tracking_params_after_the_hit_was_built_answers_false(
    recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task the handler started, still running after the response: its values reach no hit."""
    monkeypatch.setattr(_overrides, "_warned", {})
    answers: list[bool] = []
    released = anyio.Event()

    async def set_later() -> None:
        await released.wait()
        answers.append(set_tracking_params(dimension2="too late"))
        answers.append(set_tracking_params({"uid": "later"}))
        answers.append(set_tracking_params(dimension2="again"))

    async with anyio.create_task_group() as tasks:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            tasks.start_soon(set_later)  # with a copy of the request's context
            answers.append(set_tracking_params(dimension1="in time"))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
            await call_app(tracked(app, recorder), http_scope("/"))
            released.set()
    assert answers == [True, False, False, False]
    (hit,) = recorder.hits
    assert hit["dimension1"] == "in time"
    assert "dimension2" not in hit
    assert "uid" not in hit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per call site: the same names again at DEBUG only
    assert "set_tracking_params('dimension2') was called after the request's hit" in warnings[0]
    assert "set_tracking_params('uid') was called after" in warnings[1]
    assert "too late" not in caplog.text  # names only, never values


async def test_a_server_that_reuses_the_state_dict_does_not_mark_the_next_request(
    recorder: MatomoRecorder,
) -> None:
    """The mark of one request's hit is not inherited by the next one's."""
    found: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        found.append(set_tracking_params(dimension1=scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = tracked(app, recorder)
    shared: dict[str, Any] = {}
    for path in ("/a", "/b"):
        await call_app(middleware, {**http_scope(path), "state": shared})
    assert found == [True, True]
    assert [hit["dimension1"] for hit in recorder.hits] == ["/a", "/b"]


@pytest.mark.slow
def test_set_tracking_params_too_late_under_a_real_server(tmp_path: Path) -> None:
    """uvicorn: a task of the handler sets a value after the response; the log says so."""
    with (
        Collector() as collector,
        serve("tests.state_app:app", collector.tracking_url, tmp_path) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.get("/late").json() == {"found": True}
        assert client.get("/release").json() == {"found": False}
        hits = {httpx.URL(h.url or "").path: h for h in collector.wait_for_hits(2)}
    hit = hits["/late"]
    assert hit.params.get("dimension1") == "in time"
    assert "dimension2" not in hit.params
    assert "set_tracking_params('dimension2') was called after" in server.log()


# -- the app's functions ------------------------------------------------------------------


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/own":
        scope["state"]["asgi_matomo"]["dimension1"] = "handler"
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_request_details_adds_parameters_when_the_response_ends(
    recorder: MatomoRecorder,
) -> None:
    calls: list[tuple[str, int]] = []

    def details(scope: Scope, status: int) -> dict[str, Any]:
        calls.append((scope["path"], status))
        return {"uid": scope.get("user", "anonymous"), "dimension1": "app", "dimension2": status}

    app = tracked(ok_app, recorder, request_details=details)
    await call_app(app, {**http_scope("/"), "user": "ada"})
    await call_app(app, http_scope("/own"))
    first, second = recorder.hits
    assert calls == [("/", 201), ("/own", 201)]
    assert (first["uid"], first["dimension1"], first["dimension2"]) == ("ada", "app", "201")
    # The handler's own word wins over the app-wide function.
    assert (second["uid"], second["dimension1"]) == ("anonymous", "handler")


async def test_visitor_id_function(recorder: MatomoRecorder) -> None:
    ids = VisitorIds(KEY.encode(), 1)

    def visitor(scope: Scope) -> str | None:
        return scope.get("user")

    app = tracked(ok_app, recorder, visitor_id=visitor)
    await call_app(app, {**http_scope("/"), "user": "ada"})
    await call_app(app, {**http_scope("/"), "user": "ada"})
    await call_app(app, http_scope("/"))
    first, second, anonymous = recorder.hits
    assert first["cid"] == second["cid"] == ids.app_id("ada")
    # None: the default id of the day.
    assert anonymous["cid"] == ids.daily_id("203.0.113.7", None, float(anonymous["cdt"]))


def failing(*args: object) -> Any:
    raise ZeroDivisionError("the app's own bug")


@pytest.mark.parametrize("option", ["request_details", "visitor_id"])
async def test_a_failing_function_is_logged_once_and_the_hit_is_kept(
    option: str, recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    app = tracked(ok_app, recorder, **{option: failing})
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        for _ in range(3):
            sent = await call_app(app, http_scope("/"))
            assert sent[0]["status"] == 201
    assert len(recorder.hits) == 3
    assert all(len(hit["cid"]) == 16 for hit in recorder.hits)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    (warning,) = warnings
    assert f"the {option} function raised an exception" in warning.getMessage()
    assert warning.exc_info is not None
    assert sum(option in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 2


async def test_request_details_returning_no_dict_is_logged_once(
    recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    app = tracked(ok_app, recorder, request_details=lambda scope, status: ["uid", "x"])
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        await call_app(app, http_scope("/"))
        await call_app(app, http_scope("/"))
    (warning,) = caplog.records
    assert "returned list instead of a dict" in warning.getMessage()
    assert len(recorder.hits) == 2


async def test_request_details_returning_none_adds_nothing(recorder: MatomoRecorder) -> None:
    await call_app(tracked(ok_app, recorder, request_details=lambda s, st: None), http_scope("/"))
    assert "uid" not in recorder.hits[0]


async def test_visitor_ids_off(recorder: MatomoRecorder) -> None:
    app = tracked(ok_app, recorder, visitor_ids=False, visitor_key=None)
    cookie = (b"cookie", b"_pk_id.1.1fff=0123456789abcdef.1.")
    await call_app(app, http_scope("/", headers=[cookie]))
    assert "cid" not in recorder.hits[0]


async def async_function(scope: Scope) -> str:
    return "never awaited"


class AsyncCallable:
    async def __call__(self, scope: Scope) -> str:
        return "never awaited"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"visitor_id": False}, TypeError, r"visitor_id must be a function.*visitor_ids=False"),
        ({"visitor_id": "uid"}, TypeError, "visitor_id must be a function"),
        ({"visitor_id": async_function}, TypeError, "visitor_id must be a plain function"),
        ({"visitor_id": AsyncCallable()}, TypeError, "visitor_id must be a plain function"),
        ({"request_details": {"uid": 1}}, TypeError, "request_details must be a function"),
        ({"visitor_ids": "yes"}, TypeError, "visitor_ids must be True or False"),
        ({"visitor_ids": None}, TypeError, "visitor_ids must be True or False"),
    ],
)
def test_option_mistakes_are_clear_errors(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        MatomoMiddleware(ok_app, matomo_url="https://m.example.org", idsite=1, **options)


# -- CORS preflights --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "tracked_methods"),
    [
        ({}, ["GET", "POST"]),
        ({"allowed_methods": ["GET", "OPTIONS"]}, ["GET", "OPTIONS"]),
        ({"ignored_methods": None}, ["GET", "POST", "OPTIONS"]),
        ({"ignored_methods": ["POST"]}, ["GET", "OPTIONS"]),
    ],
)
async def test_options_requests_are_not_tracked_by_default(
    options: dict[str, Any], tracked_methods: list[str], recorder: MatomoRecorder
) -> None:
    app = tracked(ok_app, recorder, **options)
    for method in ("GET", "POST", "OPTIONS"):
        assert (await call_app(app, http_scope("/", method=method)))[0]["status"] == 201
    assert [json.loads(hit["cvar"])["2"][1] for hit in recorder.hits] == tracked_methods


async def test_a_visitor_id_that_cannot_be_hashed_is_the_functions_failure(
    recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    # str() of an int this long raises ValueError (Python's digit limit).
    app = tracked(ok_app, recorder, visitor_id=lambda scope: 10**5000)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        assert (await call_app(app, http_scope("/")))[0]["status"] == 201
    (hit,) = recorder.hits
    assert hit["cid"] == VisitorIds(KEY.encode(), 1).daily_id(
        "203.0.113.7", None, float(hit["cdt"])
    )
    assert "the visitor_id function raised" in caplog.records[0].getMessage()
