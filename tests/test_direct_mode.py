"""Direct mode (no lifespan) under a burst, over real sockets: bounded, and every hit counted.

The app runs under uvicorn with `--lifespan off`, so each request sends its own
hits. The Matomo stand-in runs under uvicorn in a thread of the test process; it
takes a while to answer, so that requests to it overlap, and records how many
were in flight at once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel
import pytest

from asgi_matomo._hit import Hit
from asgi_matomo._retry import RETRY_AFTER_CAP
from asgi_matomo._sender import BatchSender, Stats
from asgi_matomo._spool import SqliteSpool
from tests.servers import serve
from tests.test_delivery import load, stats, wait_until
from tests.threaded_server import read_body, serve_in_thread

pytestmark = pytest.mark.slow

APP = "tests.delivery_app:app"
LIMIT = 2  # max_concurrent_batches
REQUESTS = 400
ANSWER_TIME = 0.05  # seconds the stand-in takes to answer: requests to it overlap
WAIT = 60.0


@dataclass
class SlowMatomo:
    """Answers bulk requests like Matomo, after ANSWER_TIME; counts requests in flight."""

    active: int = 0
    most: int = 0
    requests: int = 0
    numbers: Counter[int] = field(default_factory=Counter)

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        assert scope["type"] == "http"
        # One event loop thread: these counters need no lock.
        self.active += 1
        self.most = max(self.most, self.active)
        self.requests += 1
        try:
            bulk = json.loads(await read_body(receive))
            await anyio.sleep(ANSWER_TIME)
            for element in bulk["requests"]:
                url = parse_qs(element.lstrip("?"))["url"][0]
                self.numbers[int(url.rsplit("n=", 1)[1])] += 1
            answer = {"status": "success", "tracked": len(bulk["requests"]), "invalid": 0}
        finally:
            self.active -= 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


@pytest.fixture
def matomo() -> Iterator[tuple[SlowMatomo, str]]:
    app = SlowMatomo()
    with serve_in_thread(app, timeout=WAIT) as url:
        yield app, url


@pytest.mark.parametrize("max_queue_size", [10_000, 20])
def test_a_burst_without_lifespan_keeps_to_the_limit_and_counts_every_hit(
    matomo: tuple[SlowMatomo, str], tmp_path: Path, max_queue_size: int
) -> None:
    app, url = matomo
    options = {"max_concurrent_batches": LIMIT, "max_queue_size": max_queue_size}
    # A keep-alive longer than a busy machine may leave a pooled connection idle: a
    # request on one the server is closing is lost to the client, not to the app.
    extra = ["--lifespan", "off", "--timeout-keep-alive", "60"]
    with serve(APP, url, tmp_path, options=options, extra=extra) as server:
        load(server, range(REQUESTS), concurrency=100)

        def settled() -> bool:
            s = stats(server)
            return bool(s["submitted"] == REQUESTS and s["queued"] == s["in_flight"] == 0)

        wait_until(settled, "every hit sent or dropped", WAIT)
        counters = stats(server)
    assert app.most <= LIMIT
    # Each hit sent is in Matomo exactly once, and the others are counted as dropped.
    assert set(app.numbers.values()) <= {1}
    assert counters["sent"] == sum(app.numbers.values())
    assert counters["sent"] + counters["dropped"] == REQUESTS
    assert (counters["spooled"], counters["rejected"], counters["invalid"]) == (0, 0, 0)
    if max_queue_size >= REQUESTS:
        assert counters["dropped"] == 0
    # The hits of requests that found the limit reached went in batches.
    assert app.requests < REQUESTS


def test_a_request_stops_taking_waiting_hits_while_others_keep_coming(
    matomo: tuple[SlowMatomo, str],
) -> None:
    """Under a steady load the queue never empties: the first request must still finish.

    Its task takes what waits for about http_timeout, then leaves it to the next
    request (a server or an adapter that awaits the app's call would wait as long).
    """
    app, url = matomo
    numbers = iter(range(1_000_000))

    def hits() -> list[Hit]:
        return [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2F%3Fn%3D{next(numbers)}", time.time())]

    async def main() -> Stats:
        sender = BatchSender(endpoint=url, max_concurrent_batches=1, http_timeout=0.5)
        first_done = anyio.Event()

        async def first() -> None:
            await sender.send_now(hits())
            first_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            # Requests keep coming, each leaving its hit to the one sending, until
            # the first is done (or the deadline says it never would be).
            with anyio.move_on_after(WAIT):
                while not first_done.is_set():
                    tg.start_soon(sender.send_now, hits())
                    await anyio.sleep(0.002)
            assert first_done.is_set(), "the first request kept sending as long as hits came"
        # A last request takes what the others left.
        while sender.stats.queued:
            await sender.send_now(hits())
        return sender.stats

    s = anyio.run(main)
    submitted = next(numbers)
    assert s.submitted == submitted
    assert (s.queued, s.in_flight, s.dropped, s.spooled, s.rejected) == (0, 0, 0, 0, 0)
    assert s.sent == submitted
    assert sorted(app.numbers) == list(range(submitted))
    assert set(app.numbers.values()) == {1}


@dataclass
class BusyMatomo:
    """Answers 503 with `retry_after` while `busy`, then like Matomo; counts requests."""

    retry_after: str | None
    busy: bool = True
    requests: int = 0
    stored: int = 0

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        bulk = json.loads(await read_body(receive))
        self.requests += 1
        if self.busy:
            headers = (
                [] if self.retry_after is None else [(b"retry-after", self.retry_after.encode())]
            )
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": b"busy"})
            return
        self.stored += len(bulk["requests"])
        answer = {"status": "success", "tracked": len(bulk["requests"]), "invalid": 0}
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


class FrozenClock:
    """Monotonic time that moves only when the test moves it; backoffs take no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("retry_after", "attempts"),
    [(None, 3), ("0", 3), ("-5", 3), ("Wed, 21 Oct 2015 07:28:00 GMT", 3), ("30", 1)],
)
def test_an_outage_without_lifespan_gets_one_requests_attempts_not_one_per_request(
    retry_after: str | None, attempts: int
) -> None:
    """After a request gave up, the requests within the backoff (or Retry-After) leave their hits.

    Without that, every request of the app would try Matomo anew: one POST per
    request against a Matomo that asked for a pause.
    """
    app = BusyMatomo(retry_after)
    clock = FrozenClock()
    with serve_in_thread(app, timeout=WAIT) as url:
        sender = BatchSender(endpoint=url, clock=clock, sleep=clock.sleep)

        async def main() -> None:
            for n in range(50):
                await sender.send_now(
                    [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2F{n}", time.time())]
                )
            # The first request's attempts (a Retry-After longer than http_timeout
            # ends them at once), and nothing more while the pause lasts.
            assert app.requests == attempts
            assert (sender.stats.dropped, sender.stats.queued) == (1, 49)
            # Matomo is back after the longest pause it can ask for.
            app.busy = False
            clock.now += RETRY_AFTER_CAP * 2
            await sender.send_now([Hit("idsite=1&rec=1&url=http%3A%2F%2Fx%2Flast", time.time())])

        anyio.run(main)
    s = sender.stats
    assert (s.sent, s.dropped, s.queued, s.in_flight, s.spooled) == (50, 1, 0, 0, 0)
    assert app.stored == 50


def test_without_lifespan_leases_of_a_dead_process_are_replayed_by_a_running_one(
    tmp_path: Path,
) -> None:
    """No replayer runs in direct mode: the requests look at the spool again, every half lease."""
    path = str(tmp_path / "spool.sqlite3")
    dead = SqliteSpool(path)  # leases for 60 s and never acks: as if it was killed
    dead.put(
        [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2Fspooled{n}", time.time()) for n in range(20)]
    )
    assert len(dead.claim(20)) == 20
    dead.close()
    app = BusyMatomo(None, busy=False)
    lease_clock = MovableLeaseClock()
    clock = FrozenClock()
    with serve_in_thread(app, timeout=WAIT) as url:
        # A lease of 1 s: this process looks at a spool that seemed empty every 0.5 s.
        spool = SqliteSpool(path, lease_seconds=1.0, clock=lease_clock)
        sender = BatchSender(endpoint=url, spool=spool, clock=clock, sleep=clock.sleep)

        async def main() -> None:
            # The first request finds the spool's hits all leased.
            await sender.send_now([Hit("idsite=1&rec=1&url=http%3A%2F%2Fx%2F0", time.time())])
            assert sender.stats.replayed == 0
            lease_clock.ahead = 3600.0  # the dead process's lease expires
            clock.now += 1.0
            await sender.send_now([Hit("idsite=1&rec=1&url=http%3A%2F%2Fx%2F1", time.time())])
            await sender.aclose()

        anyio.run(main)
    assert sender.stats.replayed == 20
    assert app.stored == 22
    assert SqliteSpool(path).count() == 0


class MovableLeaseClock:
    """Unix time for the spool's leases, until the test moves it on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@dataclass
class SpoolRefusingMatomo(BusyMatomo):
    """Takes live batches, answers 503 to every batch that holds a spooled hit."""

    replays: int = 0

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        body = await read_body(receive)
        spooled = b"spooled" in body
        self.replays += spooled
        self.busy = spooled

        async def replay() -> dict[str, object]:
            return {"type": "http.request", "body": body}

        await super().__call__(scope, replay, send)


def test_without_lifespan_a_failing_replay_waits_its_backoff(tmp_path: Path) -> None:
    """Each request Matomo takes must not try a spool Matomo refuses again at once."""
    path = str(tmp_path / "spool.sqlite3")
    spool = SqliteSpool(path)
    spool.put(
        [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2Fspooled{n}", time.time()) for n in range(5)]
    )
    app = SpoolRefusingMatomo(None)
    clock = FrozenClock()
    with serve_in_thread(app, timeout=WAIT) as url:
        sender = BatchSender(endpoint=url, spool=spool, clock=clock, sleep=clock.sleep)

        async def main() -> None:
            for n in range(10):
                await sender.send_now(
                    [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2F{n}", time.time())]
                )
            # One replay, answered 503: the others wait for its backoff.
            assert app.replays == 1
            clock.now += RETRY_AFTER_CAP * 2
            await sender.send_now([Hit("idsite=1&rec=1&url=http%3A%2F%2Fx%2Flast", time.time())])
            assert app.replays == 2
            await sender.aclose()

        anyio.run(main)
    assert sender.stats.sent == 11
    assert SqliteSpool(path).count() == 5


def test_an_outage_without_lifespan_keeps_what_waits_in_the_spool(tmp_path: Path) -> None:
    """Hits left in memory during the pause would be lost if the process ended: spooled."""
    app = BusyMatomo("30")
    clock = FrozenClock()
    path = str(tmp_path / "spool.sqlite3")
    with serve_in_thread(app, timeout=WAIT) as url:
        sender = BatchSender(endpoint=url, clock=clock, sleep=clock.sleep, spool=SqliteSpool(path))

        async def main() -> None:
            for n in range(50):
                await sender.send_now(
                    [Hit(f"idsite=1&rec=1&url=http%3A%2F%2Fx%2F{n}", time.time())]
                )
            assert app.requests == 1
            assert (sender.stats.spooled, sender.stats.queued, sender.stats.dropped) == (50, 0, 0)
            assert SqliteSpool(path).count() == 50
            app.busy = False
            clock.now += RETRY_AFTER_CAP * 2
            await sender.send_now([Hit("idsite=1&rec=1&url=http%3A%2F%2Fx%2Flast", time.time())])
            await sender.aclose()

        anyio.run(main)
    s = sender.stats
    assert (s.sent, s.replayed, s.dropped, s.queued) == (51, 50, 0, 0)
    assert app.stored == 51
    assert SqliteSpool(path).count() == 0
