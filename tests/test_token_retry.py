"""A rejected access_token is tried again later, over real sockets.

The stand-in answers bulk requests as Matomo 5.1 does: with a token it does not
accept, the hits that carry `cip` are counted invalid, the others tracked. It
runs under uvicorn on loopback; the sender runs in the test's event loop, with a
monotonic clock the test moves on to the time of the retry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import anyio
import pytest

from asgi_matomo._hit import Hit
from asgi_matomo._sender import BatchSender
from asgi_matomo._token import RECONSIDER_AFTER, RECONSIDER_JITTER
from tests.threaded_server import read_body, serve_in_thread

TOKEN = "the-token"
DEADLINE = 20.0


@dataclass
class Matomo:
    """Counts a bulk's hits with cip invalid unless it carries `accepted` as token_auth."""

    accepted: str | None = None
    tokens: list[bool] = field(default_factory=list)  # whether each request carried one
    stored: list[dict[str, list[str]]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        assert scope["type"] == "http"
        bulk = json.loads(await read_body(receive))
        token = bulk.get("token_auth")
        self.tokens.append(token is not None)
        elements = [parse_qs(element.lstrip("?")) for element in bulk["requests"]]
        good = self.accepted is not None and token == self.accepted
        taken = [e for e in elements if good or "cip" not in e]
        self.stored += taken
        answer = {"status": "success", "tracked": len(taken), "invalid": len(elements) - len(taken)}
        body = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def matomo() -> Iterator[tuple[Matomo, str]]:
    app = Matomo()
    with serve_in_thread(app, timeout=DEADLINE) as url:
        yield app, url


class MovableClock:
    """time.monotonic(), until the test moves it on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


def visitor_hits(first: int, n: int) -> list[Hit]:
    now = time.time()
    return [
        Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now, cip=f"203.0.113.{i}")
        for i in range(first, first + n)
    ]


def test_a_token_fixed_in_matomo_is_used_again_without_a_restart(
    matomo: tuple[Matomo, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, url = matomo
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    clock = MovableClock()
    sender = BatchSender(endpoint=url, access_token=TOKEN, batch_size=5, clock=clock)

    def rejected() -> bool:
        return sender.stats.token_rejected

    async def deliver(first: int) -> None:
        for hit in visitor_hits(first, 5):
            sender.submit(hit)
        assert await sender.aflush(DEADLINE)

    async def main() -> None:
        async with sender.running_in_background():
            # Matomo refuses the token: found out, every hit delivered without cip.
            await deliver(0)
            assert rejected()
            assert app.tokens == [True, False]
            # The admin gives the token write access; until the retry is due, the
            # sender goes on without it.
            app.accepted = TOKEN
            await deliver(5)
            assert app.tokens == [True, False, False]
            # Due: the next batch carries the token again, is taken whole, and so
            # are the following ones.
            clock.ahead = RECONSIDER_AFTER * (1 + RECONSIDER_JITTER)
            await deliver(10)
            assert not rejected()
            await deliver(15)
            assert app.tokens == [True, False, False, True, True]

    anyio.run(main)
    stats = sender.stats
    assert (stats.sent, stats.invalid, stats.dropped, stats.rejected) == (20, 0, 0, 0)
    assert sorted(int(e["url"][0].rsplit("/", 1)[1]) for e in app.stored) == list(range(20))
    # The visitor IPs are back from the retry on.
    assert sorted(e["cip"][0] for e in app.stored if "cip" in e) == sorted(
        f"203.0.113.{i}" for i in range(10, 20)
    )
    infos = [
        r.getMessage() for r in caplog.records if "accepts the access_token again" in r.getMessage()
    ]
    assert len(infos) == 1
    assert [r.levelno for r in caplog.records if "rejected the access_token" in r.getMessage()] == [
        logging.ERROR
    ]
    assert TOKEN not in caplog.text


def test_a_token_still_refused_at_its_retry_costs_one_failed_login(
    matomo: tuple[Matomo, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, url = matomo
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    clock = MovableClock()
    sender = BatchSender(endpoint=url, access_token=TOKEN, batch_size=5, clock=clock)

    async def main() -> None:
        async with sender.running_in_background():
            for round_ in range(3):
                clock.ahead = round_ * RECONSIDER_AFTER * 2  # each round: a retry is due
                for hit in visitor_hits(5 * round_, 5):
                    sender.submit(hit)
                assert await sender.aflush(DEADLINE)
                assert sender.stats.token_rejected

    anyio.run(main)
    # Each round: one request with the token (a failed login), its resend without.
    assert app.tokens == [True, False] * 3
    assert (sender.stats.sent, sender.stats.invalid) == (15, 0)
    assert not any("cip" in e for e in app.stored)
    still = [r for r in caplog.records if "still rejects the access_token" in r.getMessage()]
    assert [r.levelno for r in still] == [logging.INFO] * 2


@dataclass
class FlakyMatomo(Matomo):
    """Matomo that answers 503 to the next `failures` requests, and slowly to a token."""

    failures: int = 0
    token_answer_time: float = 0.0

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        if self.failures:
            self.failures -= 1
            self.tokens.append(json.loads(await read_body(receive)).get("token_auth") is not None)
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"busy"})
            return
        body = await read_body(receive)
        if self.token_answer_time and json.loads(body).get("token_auth") is not None:
            await anyio.sleep(self.token_answer_time)

        async def replay() -> dict[str, object]:
            return {"type": "http.request", "body": body}

        await super().__call__(scope, replay, send)


def test_a_batch_retrying_when_the_token_is_tried_again_waits_for_the_verdict() -> None:
    """A retry that begins after the token was put back in doubt sends it only after the probe.

    Sent with the token beside the probe, it would be one more failed login, and
    its hits with cip, found invalid once the probe had used its budget, lost.
    """
    # The probe's answer takes longer than the other batch's backoff: both would carry it.
    app = FlakyMatomo(token_answer_time=1.0)
    clock = MovableClock()
    with serve_in_thread(app, timeout=DEADLINE) as url:
        sender = BatchSender(endpoint=url, access_token=TOKEN, batch_size=5, clock=clock)

        async def main() -> None:
            await sender.send_now(visitor_hits(0, 5))
            assert sender.stats.token_rejected
            app.failures = 1
            async with anyio.create_task_group() as tg:
                # This batch leaves without the token, is answered 503 and backs off...
                tg.start_soon(sender.send_now, visitor_hits(5, 5))
                with anyio.fail_after(DEADLINE):
                    while len(app.tokens) < 3:
                        await anyio.sleep(0.01)
                # ... while the next batch finds the token due to be tried again.
                clock.ahead = RECONSIDER_AFTER * (1 + RECONSIDER_JITTER)
                tg.start_soon(sender.send_now, visitor_hits(10, 5))

        anyio.run(main)
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.invalid, stats.dropped, stats.rejected) == (15, 0, 0, 0)
    # The first verdict and the retry: one request with the token each.
    assert app.tokens.count(True) == 2
    assert sorted(int(e["url"][0].rsplit("/", 1)[1]) for e in app.stored) == list(range(15))
    assert not any("cip" in e for e in app.stored)
