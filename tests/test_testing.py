"""`asgi_matomo.testing.MatomoRecorder` with the three ways users test their apps."""

from __future__ import annotations

import json
import warnings
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware
from asgi_matomo.testing import MatomoRecorder, RecordedRequest

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient and warns once, on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

TOKEN = "recorder-token"
HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) recorder-tests",
    "Accept-Language": "sv-SE,sv;q=0.9",
    "Referer": "https://ref.example/",
}


async def foo(request: Request) -> JSONResponse:
    request.scope["state"]["asgi_matomo"] = {"cvar": {"anything": "goes"}}
    return JSONResponse({"name": "foo"})


def make_app(recorder: MatomoRecorder, **options: Any) -> Starlette:
    return Starlette(
        routes=[Route("/foo", foo)],
        middleware=[
            Middleware(
                MatomoMiddleware,
                matomo_url="https://matomo.test",
                idsite=1,
                client=recorder.client,
                route_details={"/foo": {"action_name": "Foo/foo", "e_c": "Foo", "e_a": "Play"}},
                **{"flush_interval": 0.05, **options},
            )
        ],
    )


def check_page_and_event(hits: list[dict[str, str]], *, with_ip: bool) -> None:
    page, event = hits
    assert page["action_name"] == "Foo/foo"
    assert page["url"].startswith("https://testserver/foo")
    assert page["ua"] == HEADERS["User-Agent"]
    assert page["lang"] == HEADERS["Accept-Language"]
    assert page["urlref"] == HEADERS["Referer"]
    assert page["cdt"].isdigit()
    assert page["pf_srv"].isdigit()
    assert json.loads(page["cvar"]) == {
        "1": ["http_status_code", "200"],
        "2": ["http_method", "GET"],
        "3": ["anything", "goes"],
    }
    assert (event["e_c"], event["e_a"], event["ca"]) == ("Foo", "Play", "1")
    assert ("cip" in page) is with_ip
    assert all("token_auth" not in hit for hit in hits)


def test_test_client_without_with() -> None:
    # No lifespan: each hit is sent before the request returns (direct mode).
    recorder = MatomoRecorder()
    client = TestClient(make_app(recorder))
    assert client.get("/foo?x=1", headers=HEADERS).json() == {"name": "foo"}
    check_page_and_event(recorder.hits, with_ip=False)
    assert recorder.hits[0]["url"] == "https://testserver/foo?x=1"
    (request,) = recorder.requests
    assert request == RecordedRequest(
        "POST", "https://matomo.test/matomo.php", recorder.hits, had_token=False, bulk=True
    )


def test_test_client_with_with_and_a_token() -> None:
    recorder = MatomoRecorder()
    with TestClient(make_app(recorder, access_token=TOKEN)) as client:
        client.get("/foo", headers=HEADERS)
        # The sender runs in the app's event loop: wait there.
        hits = client.portal.call(recorder.wait_for, 2)
    check_page_and_event(hits, with_ip=True)
    assert hits[0]["cip"] == "testclient"  # what Starlette's TestClient calls its peer
    assert all(request.had_token for request in recorder.requests)
    assert TOKEN not in repr(recorder.requests)


def test_hits_are_flushed_when_the_with_block_ends() -> None:
    recorder = MatomoRecorder()
    with TestClient(make_app(recorder, flush_interval=60)) as client:
        client.get("/foo", headers=HEADERS)
        assert recorder.hits == []
    check_page_and_event(recorder.hits, with_ip=False)


@pytest.mark.anyio
async def test_asgi_transport_with_lifespan_manager() -> None:
    recorder = MatomoRecorder()
    async with (
        LifespanManager(make_app(recorder)) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        response = await client.get("/foo", headers=HEADERS)
        assert response.status_code == 200
        hits = await recorder.wait_for(2)
    check_page_and_event(hits, with_ip=False)
    recorder.clear()
    assert recorder.hits == []
    assert recorder.requests == []
    await recorder.aclose()
    await recorder.aclose()


@pytest.mark.anyio
async def test_wait_for_times_out_with_advice() -> None:
    recorder = MatomoRecorder()
    with pytest.raises(TimeoutError, match=r"expected at least 1 Matomo hits within 0\.05s, got 0"):
        await recorder.wait_for(1, timeout=0.05)


@pytest.mark.anyio
async def test_answers_like_matomo_bulk_tracking() -> None:
    recorder = MatomoRecorder()
    body = {
        "requests": ["?idsite=1&rec=1&url=https%3A%2F%2Fa.test%2F", {"idsite": 1, "rec": True}],
        "token_auth": "",
    }
    response = await recorder.client.post("https://matomo.test/matomo.php", json=body)
    assert response.status_code == 200
    assert response.json() == {"status": "success", "tracked": 2, "invalid": 0}
    assert recorder.hits == [
        {"idsite": "1", "rec": "1", "url": "https://a.test/"},
        {"idsite": "1", "rec": "1"},
    ]
    assert not recorder.requests[0].had_token


@pytest.mark.anyio
async def test_element_token_and_odd_elements() -> None:
    recorder = MatomoRecorder()
    body = {"requests": ["?idsite=1&token_auth=t", 42, "no-query", {"e_v": 2.0, "x": None}]}
    await recorder.client.post("https://matomo.test/matomo.php", json=body)
    assert recorder.hits == [{"idsite": "1"}, {}, {}, {"e_v": "2", "x": ""}]
    assert recorder.requests[0].had_token


@pytest.mark.anyio
async def test_single_hits_are_recorded_too() -> None:
    recorder = MatomoRecorder()
    client = recorder.client
    assert client is recorder.client
    get = await client.get("https://matomo.test/matomo.php?idsite=1&rec=1&token_auth=t")
    post = await client.post(
        "https://matomo.test/matomo.php?idsite=2", data={"idsite": "3", "action_name": "x"}
    )
    assert (get.status_code, post.status_code) == (204, 204)
    assert recorder.hits == [{"idsite": "1", "rec": "1"}, {"idsite": "2", "action_name": "x"}]
    assert [(r.method, r.bulk, r.had_token) for r in recorder.requests] == [
        ("GET", False, True),
        ("POST", False, False),
    ]
