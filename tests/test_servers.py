"""The middleware under every server users run it on, over real HTTP on loopback.

uvicorn (on asyncio with h11, on uvloop with httptools, and with lifespan off:
then each hit is sent right after its response), hypercorn on asyncio, uvloop
and trio, and granian. Each serves tests.apps:server_app: plain, streaming and
file responses on one keep-alive connection, and clients that go away before
the response is complete.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from tests.servers import Server, serve

pytestmark = pytest.mark.slow

APP = "tests.apps:server_app"
ASYNCIO_H11 = ("--loop", "asyncio", "--http", "h11")
SERVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "uvicorn": ("uvicorn", ASYNCIO_H11),
    # What `pip install uvicorn[standard]` runs.
    "uvicorn-uvloop-httptools": ("uvicorn", ("--loop", "uvloop", "--http", "httptools")),
    "uvicorn-lifespan-off": ("uvicorn", ("--lifespan", "off", *ASYNCIO_H11)),
    "hypercorn-asyncio": ("hypercorn-asyncio", ()),
    "hypercorn-trio": ("hypercorn-trio", ()),
    "hypercorn-uvloop": ("hypercorn-uvloop", ()),
    "granian": ("granian", ()),
}
# Servers that offer the `http.response.pathsend` extension for file responses.
PATHSEND = frozenset({"granian"})
_ids = itertools.count(1)


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@contextlib.contextmanager
def start(name: str, collector: Collector, tmp_path: Path) -> Iterator[Server]:
    kind, extra = SERVERS[name]
    with serve(APP, collector.tracking_url, tmp_path, kind=kind, extra=extra) as server:
        yield server


def rid() -> str:
    return f"r{next(_ids)}"


def hits_by_rid(hits: list[StoredHit]) -> dict[str, list[StoredHit]]:
    found: dict[str, list[StoredHit]] = {}
    for hit in hits:
        assert hit.url is not None
        found.setdefault(httpx.URL(hit.url).params.get("rid", ""), []).append(hit)
    return found


@pytest.mark.parametrize("name", list(SERVERS))
def test_responses_on_one_keep_alive_connection(
    name: str, collector: Collector, tmp_path: Path
) -> None:
    expected: dict[str, tuple[str, int]] = {}

    def get(client: httpx.Client, path: str, status: int, **params: str) -> httpx.Response:
        request_id = rid()
        response = client.get(path, params={"rid": request_id, **params})
        assert response.status_code == status
        # The path and query exactly as sent, which is what Matomo must get.
        expected[request_id] = (response.request.url.raw_path.decode(), status)
        return response

    with start(name, collector, tmp_path) as server, httpx.Client(base_url=server.url) as client:
        # Three requests on one connection: the app saw one client port.
        peers = {get(client, "/", 200).text for _ in range(3)}
        assert len(peers) == 1
        stream = get(client, "/stream", 200, chunks="5")
        assert stream.text == "".join(f"chunk {i}\n" for i in range(5))
        file = get(client, "/file", 200)
        assert file.content == (Path(__file__).parent / "apps.py").read_bytes()
        assert file.headers["x-pathsend"] == ("1" if name in PATHSEND else "0")
        get(client, "/nothing-here", 404)
    # Stopped and flushed: every request exactly once.
    hits = hits_by_rid(collector.hits())
    assert sorted(hits) == sorted(expected)
    host = server.url.removeprefix("http://")
    for request_id, (target, status) in expected.items():
        (hit,) = hits[request_id]
        assert hit.url == f"https://{host}{target}"
        assert hit.http_status == status
        assert hit.pf_srv is not None
        if target.startswith("/stream"):
            # Five 20 ms pauses between chunks: the time covers the whole body.
            assert hit.pf_srv >= 100


@pytest.mark.parametrize("name", list(SERVERS))
def test_client_gone_mid_response(name: str, collector: Collector, tmp_path: Path) -> None:
    with start(name, collector, tmp_path) as server:
        gone_mid_body = rid()
        with httpx.Client(base_url=server.url) as client:
            url = f"/endless?rid={gone_mid_body}"
            with client.stream("GET", url) as response:
                assert response.status_code == 200
                next(response.iter_bytes())
            # Leaving the block closes the connection with most of the body unsent.
        # The request ends when the server notices, not at shutdown.
        (hit,) = collector.wait_for_hits(1)
    assert hits_by_rid([hit]) == {gone_mid_body: [hit]}
    assert hit.http_status == 200  # the status line had gone out
    assert hit.pf_srv is not None
    assert len(collector.hits()) == 1


@pytest.mark.parametrize("name", ["uvicorn", "uvicorn-uvloop-httptools", "hypercorn-asyncio"])
def test_client_gone_before_the_response(name: str, collector: Collector, tmp_path: Path) -> None:
    """The client gave up waiting: the app answers afterwards, to nobody."""
    with start(name, collector, tmp_path) as server:
        request_id = rid()
        with (
            httpx.Client(base_url=server.url, timeout=0.3) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.get("/wait-for-disconnect", params={"rid": request_id})
        (hit,) = collector.wait_for_hits(1)
    assert hits_by_rid([hit]) == {request_id: [hit]}
    # nginx's 499 "client closed request", as for a client gone before any answer.
    assert hit.http_status == 499


@pytest.mark.parametrize(
    ("extra", "immediate"), [(("--lifespan", "off"), True), ((), False)], ids=["off", "on"]
)
def test_uvicorn_lifespan_off_sends_each_hit_after_its_response(
    extra: tuple[str, ...], immediate: bool, collector: Collector, tmp_path: Path
) -> None:
    """Without lifespan nothing runs a batch sender: each hit goes out on its own."""
    hold = {"flush_interval": 300, "batch_size": 10_000}
    with (
        serve(APP, collector.tracking_url, tmp_path, options=hold, extra=extra) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for count in (1, 2):
            client.get("/", params={"rid": rid()}).raise_for_status()
            if immediate:
                collector.wait_for_hits(count)
        if not immediate:
            assert collector.hits() == []  # batched, held until shutdown
    assert len(collector.hits()) == 2
    kinds = [request.kind for request in collector.requests]
    assert kinds == (["bulk", "bulk"] if immediate else ["bulk"])
