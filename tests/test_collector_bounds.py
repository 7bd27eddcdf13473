"""The collector stays bounded whatever it is sent, and its totals stay exact."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from asgi_matomo._collector import Collector
from asgi_matomo._collector._log import MAX_REASONS
from asgi_matomo._collector._page import render_visits
from asgi_matomo._collector._visits import group_visits
from tests.servers import free_port
from tests.test_visits import hit

TOKEN = "right-token-0123456789"
WRONG = "wrong-token"


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def bulk(client: httpx.Client, url: str, hits: list[dict[str, str]]) -> httpx.Response:
    requests = ["?" + urlencode(hit) for hit in hits]
    return client.post(url, json={"requests": requests})


def page_hits(first: int, count: int, idsite: int = 1) -> list[dict[str, str]]:
    """`count` page views of a browser, numbered from `first` (in their URL)."""
    return [
        {
            "idsite": str(idsite),
            "rec": "1",
            "apiv": "1",
            "url": f"https://shop.example.com/products/{n}?utm_source=newsletter",
            "action_name": f"Product {n}",
            "urlref": "https://www.example.org/search?q=asgi+matomo",
            "ua": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0",
            "lang": "en-GB,en;q=0.9",
            "pf_srv": "12",
            "cvar": '{"1":["http_status_code","200"]}',
            "_id": "0123456789abcdef",
        }
        for n in range(first, first + count)
    ]


@contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            yield process
        finally:
            if process.poll() is None:  # pragma: no cover - only when the test fails
                process.kill()
                process.wait()


def db_pages(collector: Collector) -> int:
    """How many pages the in-memory database holds (its size, in pages)."""
    with collector._cond:
        pages: int = collector._hit_store._db.execute("PRAGMA page_count").fetchone()[0]
    return pages


def kept_rows(collector: Collector) -> int:
    with collector._cond:
        rows: int = collector._hit_store._db.execute("SELECT count(*) FROM hits").fetchone()[0]
    return rows


@pytest.mark.slow
def test_collector_command_keeps_max_hits_and_counts_every_hit(client: httpx.Client) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "asgi_matomo", "collector", "--port", str(port)]
    command += ["--max-hits", "50"]
    with running(command) as process:
        assert process.stdout is not None
        assert base in process.stdout.readline().decode()
        for batch in range(3):
            hits = page_hits(batch * 40, 40, idsite=1 + batch % 2)
            assert bulk(client, base + "/matomo.php", hits).json()["tracked"] == 40
        for n in range(120, 130):
            params = {"idsite": "2", "rec": "1", "url": f"https://a.test/{n}"}
            assert client.get(base + "/matomo.php", params=params).status_code == 200
        totals = client.get(base + "/api/totals").json()
        hits = client.get(base + "/api/hits", params={"limit": "1000"}).json()
        page = client.get(base + "/").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert totals == {
        "hits_stored": 130,
        "hits_kept": 50,
        "hits_evicted": 80,
        "max_hits": 50,
        "sites": {"1": 80, "2": 50},
        "other_sites": 0,
        "requests": 13,
        "elements": 130,
        "tracked": 130,
        "invalid": 0,
        "errors": 0,
    }
    # The newest 50 are kept: products 80 to 119, then the 10 single hits.
    urls = [hit["url"] for hit in reversed(hits)]
    assert urls[0].startswith("https://shop.example.com/products/80?")
    assert urls[-10:] == [f"https://a.test/{n}" for n in range(120, 130)]
    assert len(urls) == 50
    assert "80 older hits not kept: the collector keeps the latest 50 (--max-hits)" in page


def test_the_store_stays_within_max_hits(client: httpx.Client) -> None:
    with Collector(max_hits=200) as collector:
        bulk(client, collector.tracking_url, page_hits(0, 200))
        full = db_pages(collector)
        sizes = []
        for first in range(200, 2200, 100):
            bulk(client, collector.tracking_url, page_hits(first, 100))
            sizes.append(db_pages(collector))
        totals = collector.totals()
        assert kept_rows(collector) == 200
        hits = collector.wait_for_hits(2200)
    # Evicted hits leave pages that new hits take again: the database stays
    # the size of 200 hits (and a page or two), however many more come.
    assert max(sizes) <= full + full // 10
    assert sizes[-1] <= sizes[len(sizes) // 2]
    assert (totals.hits_stored, totals.hits_kept, totals.hits_evicted) == (2200, 200, 2000)
    assert totals.sites == {1: 2200}
    assert totals.tracked == 2200
    assert [hit.url for hit in hits] == [hit["url"] for hit in page_hits(2000, 200)]


def test_a_batch_larger_than_max_hits_keeps_its_newest(client: httpx.Client) -> None:
    with Collector(max_hits=3) as collector:
        bulk(client, collector.tracking_url, page_hits(0, 10))
        hits = collector.hits()
        totals = collector.totals()
    assert [hit.action_name for hit in hits] == ["Product 7", "Product 8", "Product 9"]
    assert (totals.hits_stored, totals.hits_evicted) == (10, 7)


def test_no_max_hits_keeps_every_hit(client: httpx.Client) -> None:
    with Collector(max_hits=None) as collector:
        bulk(client, collector.tracking_url, page_hits(0, 300))
        assert len(collector.hits()) == 300
        assert collector.totals().hits_evicted == 0


def test_a_file_kept_from_an_earlier_run_is_counted_and_trimmed(
    client: httpx.Client, tmp_path: Path
) -> None:
    db = tmp_path / "hits.sqlite"
    with Collector(db_path=db, max_hits=None) as collector:
        bulk(client, collector.tracking_url, page_hits(0, 20, idsite=1))
        bulk(client, collector.tracking_url, page_hits(20, 10, idsite=2))
    with Collector(db_path=db, max_hits=10) as collector:
        totals = collector.totals()
        hits = collector.hits()
    assert (totals.hits_stored, totals.hits_kept, totals.hits_evicted) == (30, 10, 20)
    assert totals.sites == {1: 20, 2: 10}
    assert [hit.action_name for hit in hits] == [f"Product {n}" for n in range(20, 30)]
    with sqlite3.connect(db) as db_file:
        assert db_file.execute("SELECT count(*) FROM hits").fetchone()[0] == 10


def test_requests_kept_are_bounded_and_counted(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._server.MAX_REQUESTS_KEPT", 5)
    with Collector(sites=[1]) as collector:
        for n in range(12):
            idsite = "1" if n % 3 else "9"
            client.get(collector.tracking_url, params={"idsite": idsite, "rec": "1"})
        kept = collector.wait_for_requests(12)
        totals = collector.totals()
    assert len(kept) == 5
    assert [request.status for request in kept] == [200, 200, 400, 200, 200]  # n = 7 to 11
    assert (totals.requests, totals.tracked, totals.invalid, totals.errors) == (12, 8, 4, 4)


def test_sites_counted_one_by_one_are_bounded(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._store.MAX_SITES_COUNTED", 2)
    with Collector() as collector:
        for site in (1, 2, 3, 4, 1):
            bulk(client, collector.tracking_url, page_hits(0, 3, idsite=site))
        totals = collector.totals()
        answered = client.get(collector.base_url + "/api/totals").json()
    assert totals.sites == {1: 6, 2: 3}
    assert totals.other_sites == 6
    assert totals.hits_stored == 15
    assert answered == totals.to_json()
    assert answered["sites"] == {"1": 6, "2": 3}


def test_refusal_reasons_are_bounded(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    unknown_sites = [{"idsite": str(site), "rec": "1"} for site in range(2, 2 + 3 * MAX_REASONS)]
    with Collector(sites=[1]) as collector:
        answer = bulk(client, collector.tracking_url, unknown_sites).json()
        followed = len(collector._refusals)
    assert answer["invalid"] == 3 * MAX_REASONS
    # One line per site up to the bound, then one for all the others.
    said = [r.getMessage() for r in caplog.records if r.name == "asgi_matomo"]
    assert len(said) == MAX_REASONS + 1
    assert followed == MAX_REASONS + 1


def test_failed_logins_are_counted_for_a_bounded_number_of_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._server.MAX_PEERS", 3)
    with Collector(token=TOKEN, sites=[1]) as collector:
        peers = [f"127.0.0.{n}" for n in range(2, 8)]
        for peer in peers:
            transport = httpx.HTTPTransport(local_address=peer)
            with httpx.Client(transport=transport, timeout=10) as client:
                params = {"idsite": "1", "rec": "1", "token_auth": WRONG}
                assert client.get(collector.tracking_url, params=params).status_code == 200
        with collector._cond:
            counted = dict(collector._failed_logins)
    assert counted == dict.fromkeys(peers[-3:], 1)


@pytest.mark.parametrize("max_hits", [0, -5, True, 2.5, "100"])
def test_max_hits_must_be_a_positive_number(max_hits: object) -> None:
    with pytest.raises(ValueError, match="max_hits"):
        Collector(max_hits=max_hits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("evicted", "said"),
    [(0, None), (1, "1 older hit not kept"), (12345, "12,345 older hits not kept")],
)
def test_the_page_says_how_many_hits_are_not_kept(evicted: int, said: str | None) -> None:
    visits = group_visits([hit(1, 0)])
    summary = render_visits(visits, hits_kept=10, hits_evicted=evicted, hits_limit=1000)
    if said is None:
        assert "not kept" not in summary
    else:
        assert said in summary


def test_open_connections_are_bounded(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._wire.MAX_CONNECTIONS", 2)
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    with Collector() as collector:
        port = int(collector.base_url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            # Closed at once: the read ends (or fails) instead of waiting.
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as third,
                contextlib.suppress(ConnectionResetError),
            ):
                assert third.recv(1) == b""
            idle.pop().close()
            server = collector._server
            assert server is not None
            deadline = time.monotonic() + 10
            while len(server._open) >= 2:
                assert time.monotonic() < deadline, "the closed connection was not released"
                time.sleep(0.01)
            assert client.get(collector.tracking_url, params={"idsite": "1"}).status_code == 200
        finally:
            for connection in idle:
                connection.close()
    said = [r.getMessage() for r in caplog.records if r.name == "asgi_matomo"]
    assert any("2 connections are open already" in line for line in said)
