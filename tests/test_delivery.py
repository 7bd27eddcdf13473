"""Delivery over real sockets: a real uvicorn app, a real Matomo stand-in on loopback.

Every hit is counted one by one at the receiving end by the request number the
test put in the URL.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from tests.servers import Server, serve

pytestmark = pytest.mark.slow

APP = "tests.delivery_app:app"
WAIT = 60.0


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(sites=[1]) as running:
        yield running


def numbers(hits: list[StoredHit]) -> Counter[int]:
    """How many times each request number reached Matomo."""
    counted: Counter[int] = Counter()
    for hit in hits:
        assert hit.url is not None
        counted[int(hit.url.rsplit("n=", 1)[1])] += 1
    return counted


def load(server: Server, numbers: range, concurrency: int = 20) -> None:
    """Send numbered requests concurrently; every response must be the app's own."""

    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
            semaphore = anyio.Semaphore(concurrency)

            async def one(n: int) -> None:
                async with semaphore:
                    response = await client.get("/", params={"n": n})
                assert response.status_code == 200
                assert response.text == f"hello {n}"

            async with anyio.create_task_group() as tg:
                for n in numbers:
                    tg.start_soon(one, n)

    anyio.run(main)


def stats(server: Server) -> dict[str, Any]:
    with httpx.Client() as client:
        result: dict[str, Any] = client.get(server.url + "/stats").json()
        return result


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)  # polling a condition with a deadline


def test_every_request_is_received_exactly_once(collector: Collector, tmp_path: Path) -> None:
    # Batches are cut by size only (a busy machine serving fewer than 50 requests
    # in a flush interval would send partial ones), and by the shutdown flush.
    options = {"batch_size": 50, "flush_interval": 60.0}
    with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
        load(server, range(600))
    # SIGTERM: the graceful shutdown flushed what was still queued.
    assert "Application shutdown complete" in server.log()
    hits = collector.wait_for_hits(600, timeout=WAIT)
    assert numbers(hits) == Counter(range(600))
    # Batched: far fewer Matomo requests than hits. How full each batch is depends on
    # how fast the requests arrive (a batch also leaves after flush_interval), so the
    # bound leaves room for a slow, busy machine.
    assert len(collector.requests) <= 600 // 10


def test_matomo_down_then_back_loses_nothing(collector: Collector, tmp_path: Path) -> None:
    options = {"batch_size": 20, "flush_interval": 0.2}
    with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
        load(server, range(100))
        collector.wait_for_hits(100, timeout=WAIT)
        collector.stop()
        load(server, range(100, 300))
        wait_until(lambda: stats(server)["retried"] > 0, "a retry while Matomo is down")
        collector.start()
        load(server, range(300, 400))
        collector.wait_for_hits(400, timeout=WAIT)
        counters = stats(server)
    assert numbers(collector.hits()) == Counter(range(400))
    assert counters["dropped"] == 0
    assert counters["sent"] == 400


def spool_options(tmp_path: Path) -> dict[str, Any]:
    """A spool, and deadlines short enough that hits reach it within a test."""
    return {
        "spool_path": str(tmp_path / "spool.sqlite"),
        "flush_interval": 0.2,
        "retry_deadline": 1.0,
        "shutdown_timeout": 1.0,
    }


def test_spool_keeps_hits_across_a_restart_while_matomo_is_down(
    collector: Collector, tmp_path: Path
) -> None:
    options = spool_options(tmp_path)
    collector.stop()
    sent_at = time.time()
    with serve(APP, collector.tracking_url, tmp_path, options=options) as first:
        load(first, range(150))
        wait_until(lambda: stats(first)["spooled"] > 0, "hits reaching the spool")
    # SIGTERM while Matomo is down: whatever was still in memory went to the spool.
    assert "Application shutdown complete" in first.log()
    assert collector.requests == [] or all(r.status == 0 for r in collector.requests)
    with serve(APP, collector.tracking_url, tmp_path, options=options) as second:
        collector.start()
        # The replay at startup may run before Matomo is back; a delivered batch
        # tells the sender it is back, and the spool follows.
        load(second, range(150, 160))
        hits = collector.wait_for_hits(160, timeout=WAIT)
        counters = stats(second)
    assert numbers(hits) == Counter(range(160))
    assert counters["replayed"] == 150
    # Replayed hits keep their original time (cdt), not the time of the replay.
    replayed = [hit for hit in hits if int(hit.url.rsplit("n=", 1)[1]) < 150]  # type: ignore[union-attr]
    assert all(sent_at - 1 <= hit.time <= sent_at + 60 for hit in replayed)
    assert all(hit.time <= hit.received for hit in replayed)


def test_spooled_hits_follow_matomo_back_without_new_traffic(
    collector: Collector, tmp_path: Path
) -> None:
    options = spool_options(tmp_path)
    collector.stop()
    with serve(APP, collector.tracking_url, tmp_path, options=options) as first:
        load(first, range(50))
        wait_until(lambda: stats(first)["spooled"] > 0, "hits reaching the spool")
    with serve(APP, collector.tracking_url, tmp_path, options=options) as second:
        # The replay at startup found Matomo down (/stats is not tracked: no traffic).
        wait_until(lambda: stats(second)["batches"] > 0, "a replay attempt while Matomo is down")
        collector.start()
        hits = collector.wait_for_hits(50, timeout=WAIT)
        counters = stats(second)
    assert numbers(hits) == Counter(range(50))
    assert counters["replayed"] == 50
    assert counters["submitted"] == 0


def test_slow_matomo_changes_no_response_and_keeps_memory_bounded(
    collector: Collector, tmp_path: Path
) -> None:
    collector.set_fault(delay=3.0)
    options = {"batch_size": 10, "max_queue_size": 50, "max_concurrent_batches": 2}
    with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
        load(server, range(300))
        counters = stats(server)
        assert counters["queued"] <= 50
        assert counters["in_flight"] <= 2 * 10
        collector.clear_fault()
    # Every request is accounted for: in memory, on its way, delivered, or dropped
    # because memory was full (no spool configured).
    assert counters["submitted"] == 300
    assert counters["dropped"] > 0
    assert (
        sum(
            counters[key]
            for key in ("queued", "in_flight", "sent", "invalid", "rejected", "dropped")
        )
        == 300
    )
    collector.wait_for_hits(300 - counters["dropped"] - counters["queued"], timeout=WAIT)
    assert all(count == 1 for count in numbers(collector.hits()).values())


@pytest.mark.parametrize(
    ("fault", "retried"),
    [
        ({"status": 500, "body": b'{"status":"error"}'}, True),
        ({"status": 503, "body": b"down for maintenance"}, True),
        ({"status": 429, "headers": {"Retry-After": "1"}}, True),
        # A 200 that is not Matomo's (a login page, a proxy): rejected, not retried.
        ({"status": 200, "body": b"<html>not matomo</html>"}, False),
    ],
)
def test_error_answers_then_recovery(
    collector: Collector, tmp_path: Path, fault: dict[str, Any], retried: bool
) -> None:
    collector.set_fault(count=2, **fault)
    options = {"batch_size": 10, "flush_interval": 0.2}
    with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
        load(server, range(30))
        if retried:
            collector.wait_for_hits(30, timeout=WAIT)
        else:
            collector.wait_for_requests(3, timeout=WAIT)
        counters = stats(server)
    delivered = numbers(collector.hits())
    assert all(count == 1 for count in delivered.values())
    if retried:
        assert delivered == Counter(range(30))
        assert counters["retried"] >= 2
    else:
        # The two faulted batches were refused as a whole, the rest got through.
        assert counters["rejected"] > 0
        assert counters["rejected"] + len(delivered) == 30
    assert counters["dropped"] == 0


def test_client_error_is_not_retried_and_is_counted(collector: Collector, tmp_path: Path) -> None:
    collector.set_fault(status=400, body=b"Bad request", count=1)
    options = {"batch_size": 5, "flush_interval": 0.2}
    with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
        load(server, range(5), concurrency=5)
        wait_until(lambda: stats(server)["rejected"] == 5, "the 400 counted as rejected")
        load(server, range(5, 10), concurrency=5)
        collector.wait_for_hits(5, timeout=WAIT)
        counters = stats(server)
    assert numbers(collector.hits()) == Counter(range(5, 10))
    assert counters["retried"] == 0
    assert counters["rejected"] == 5


def test_a_wrong_token_is_dropped_before_matomo_blocks_the_server(tmp_path: Path) -> None:
    with Collector(sites=[1], token="the-right-token") as collector:
        options = {"access_token": "a-wrong-token", "batch_size": 5, "flush_interval": 0.2}
        with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
            for start in range(0, 60, 5):
                # One batch at a time, so that every batch is a separate chance to fail.
                load(server, range(start, start + 5), concurrency=5)
                collector.wait_for_hits(start + 5, timeout=WAIT)
            counters = stats(server)
        with_token = [request for request in collector.requests if request.has_token]
    # Matomo blocks an IP after about 20 failed logins (MATOMO.md): stay far below.
    assert 1 <= len(with_token) <= 3
    assert counters["token_rejected"] is True
    assert numbers(collector.hits()) == Counter(range(60))
    assert all("cip" not in hit.params for hit in collector.hits())


def test_the_right_token_sends_the_visitor_ip(tmp_path: Path) -> None:
    with Collector(sites=[1], token="the-right-token") as collector:
        options = {"access_token": "the-right-token", "flush_interval": 0.2}
        with serve(APP, collector.tracking_url, tmp_path, options=options) as server:
            load(server, range(3), concurrency=1)
            hits = collector.wait_for_hits(3, timeout=WAIT)
    assert {hit.visitor_ip for hit in hits} == {"127.0.0.1"}
    assert all(hit.params["cip"] == "127.0.0.1" for hit in hits)
    assert "token_auth" not in hits[0].params


def test_a_visitor_without_user_agent_is_not_reported_as_httpx(
    collector: Collector, tmp_path: Path
) -> None:
    """Matomo falls back to the sender's User-Agent when a hit has no `ua`."""
    with serve(APP, collector.tracking_url, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /?n=0 HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        (hit,) = collector.wait_for_hits(1, timeout=WAIT)
    assert "ua" not in hit.params
    assert hit.ua is not None
    assert hit.ua.startswith("asgi-matomo/")
