"""Visitors as Matomo counts them, and the per-request dict, under real servers.

The local Matomo stand-in stores each hit's visitor id (`cid`); the servers are
real uvicorn processes, with two workers where the id must agree across them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from asgi_matomo._visitor_key import ENV_VAR
from tests.servers import serve

pytestmark = pytest.mark.slow

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"
PROXIED = {"trusted_proxies": ["127.0.0.1"], "flush_interval": 0.1}
STATE_APP = "tests.state_app:app"


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The servers inherit it: their per-host key file is this test's alone.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)


def query(hit: StoredHit) -> httpx.QueryParams:
    return httpx.URL(hit.url or "").params


def test_five_visitors_are_five_across_two_workers(collector: Collector, tmp_path: Path) -> None:
    served: dict[int, set[int]] = {}
    sent = 0
    with serve(
        "tests.apps:server_app",
        collector.tracking_url,
        tmp_path,
        options=PROXIED,
        extra=("--workers", "2"),
    ) as server:
        deadline = time.monotonic() + 60
        for visitor in range(1, 6):
            served[visitor] = set()
            headers = {"user-agent": BROWSER, "x-forwarded-for": f"198.51.100.{visitor}"}
            # A new connection per request, until both workers served this visitor.
            while len(served[visitor]) < 2 or sent < 3 * visitor:
                assert time.monotonic() < deadline, f"workers served: {served}"
                with httpx.Client(base_url=server.url, headers=headers) as client:
                    response = client.get("/pid", params={"v": visitor, "n": sent})
                served[visitor].add(int(response.text))
                sent += 1
    # The server has stopped, each worker's sender flushed.
    hits = collector.hits()
    assert len(hits) == sent
    ids: dict[str, set[str | None]] = {}
    for hit in hits:
        ids.setdefault(query(hit)["v"], set()).add(hit.visitor_id)
        assert "cip" not in hit.params  # no token: the visitor IP never leaves
    assert all(len(pids) == 2 for pids in served.values())
    assert all(len(visitor_ids) == 1 for visitor_ids in ids.values()), ids
    distinct = {visitor_id for visitor_ids in ids.values() for visitor_id in visitor_ids}
    assert len(distinct) == 5
    assert all(visitor_id and len(visitor_id) == 16 for visitor_id in distinct)


def test_the_cookie_and_the_uid_name_the_visitor(collector: Collector, tmp_path: Path) -> None:
    cookie = {"cookie": "theme=dark; _pk_id.1.1fff=0123456789abcdef.1733200000."}
    with serve(STATE_APP, collector.tracking_url, tmp_path, options=PROXIED) as server:
        with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}) as client:
            assert client.get("/plain", headers=cookie).status_code == 200
            assert client.get("/plain").status_code == 200
            assert client.get("/account").status_code == 200
            assert client.get("/sync").json() == {"found": True}
        cookied, hashed, account, synced = collector.wait_for_hits(4)
    assert cookied.visitor_id == "0123456789abcdef"
    assert hashed.visitor_id is not None
    assert hashed.visitor_id != cookied.visitor_id
    assert account.uid == "user-1"
    assert "cid" not in account.params
    assert synced.uid == "sync-user"


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/health", {}),
        ("GET", "/page", {"user-agent": "Googlebot/2.1"}),
        ("OPTIONS", "/page", {"origin": "https://other.example"}),
        ("DELETE", "/page", {}),
        ("POST", "/page", {}),
    ],
    ids=["excluded-path", "bot", "cors-preflight", "ignored-method", "tracked"],
)
def test_the_handler_mutates_the_dict_on_any_request(
    method: str, path: str, headers: dict[str, str], collector: Collector, tmp_path: Path
) -> None:
    with (
        serve(STATE_APP, collector.tracking_url, tmp_path, options=PROXIED) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        response = client.request(method, path, headers=headers)
        assert client.get("/plain").status_code == 200
    # The server has stopped, its sender flushed: every hit it made is here.
    hits = collector.hits()
    tracked = method == "POST"
    assert response.status_code == 200
    assert response.json() == {
        "method": method,
        "path": path,
        "keys": ["cvar", "dimension1", "uid"],
    }
    assert response.headers["x-app"] == "state"
    assert response.headers["content-type"] == "application/json"
    assert [query_path(hit) for hit in hits] == ([path] if tracked else []) + ["/plain"]
    if tracked:
        assert (hits[0].uid, hits[0].dimensions) == ("user-1", {"1": "updated"})


def query_path(hit: StoredHit) -> str:
    return httpx.URL(hit.url or "").path


# -- the examples of "Configuring tracked details" ---------------------------------------


@pytest.fixture
def docs_collector() -> Iterator[Collector]:
    with Collector(sites=[12345]) as running:
        yield running


def test_set_tracking_params_example(docs_collector: Collector, tmp_path: Path) -> None:
    app = "docs_src.details.tutorial004:app"
    with serve(app, docs_collector.tracking_url, tmp_path) as server:
        response = httpx.get(server.url + "/reports/sales", headers={"user-agent": BROWSER})
        assert response.json() == {"report": "sales"}
        (hit,) = docs_collector.wait_for_hits(1)
    assert hit.dimensions == {"1": "sales"}
    assert hit.cvar is not None
    assert hit.cvar["3"] == ["report", "sales"]
    assert hit.visitor_id is not None


def test_visitor_id_and_request_details_example(docs_collector: Collector, tmp_path: Path) -> None:
    app = "docs_src.details.tutorial005:app"
    with serve(app, docs_collector.tracking_url, tmp_path) as server:
        for headers in (
            {"authorization": "Bearer grace", "user-agent": "phone"},
            {"authorization": "Bearer grace", "user-agent": "laptop"},
            {"user-agent": "phone"},
        ):
            assert httpx.get(server.url + "/", headers=headers).json() == {"hello": "world"}
        phone, laptop, anonymous = docs_collector.wait_for_hits(3)
    # One account, one visitor on every device; its name is not sent.
    assert phone.visitor_id == laptop.visitor_id
    assert anonymous.visitor_id not in (None, phone.visitor_id)
    assert "grace" not in json.dumps(phone.params)
    assert [hit.dimensions for hit in (phone, laptop, anonymous)] == [
        {"1": "signed-in"},
        {"1": "signed-in"},
        {"1": "anonymous"},
    ]
