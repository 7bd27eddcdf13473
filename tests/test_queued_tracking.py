"""The sender behind Matomo's QueuedTracking plugin, over real sockets.

The stand-in answers as QueuedTracking 5.1.1 does (MATOMO.md): a 43-byte GIF to
every bulk it queues, and HTTP 400 with the same GIF to a whole bulk that carries
`cip` with a token it rejects (nothing of it queued), each with Connection: close.
It runs under uvicorn on loopback; the sender runs in the test's event loop.
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
from tests.threaded_server import read_body, serve_in_thread

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
GOOD_TOKEN = "the-right-token"
DEADLINE = 20.0


@dataclass
class QueuedTracking:
    """An ASGI app that answers bulk requests like QueuedTracking; records what it queued."""

    refuse_all: bool = False  # 400 GIF to every bulk, token or not (not the token's fault)
    queued: list[dict[str, list[str]]] = field(default_factory=list)
    requests: list[bool] = field(default_factory=list)  # whether each carried token_auth

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        assert scope["type"] == "http"
        body = await read_body(receive)
        bulk = json.loads(body)
        token = bulk.get("token_auth")
        self.requests.append(token is not None)
        elements = [parse_qs(element.lstrip("?")) for element in bulk["requests"]]
        carries_cip = any("cip" in element for element in elements)
        status = 200
        if self.refuse_all or (carries_cip and token != GOOD_TOKEN):
            status = 400  # the token is checked when the request is queued
        else:
            self.queued += elements
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"image/gif"),
                    (b"content-length", str(len(GIF)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": GIF})


@pytest.fixture
def queued_tracking() -> Iterator[tuple[QueuedTracking, str]]:
    app = QueuedTracking()
    with serve_in_thread(app, timeout=DEADLINE) as url:
        yield app, url


def visitor_hits(n: int) -> list[Hit]:
    now = time.time()
    return [
        Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now, cip=f"203.0.113.{i}")
        for i in range(n)
    ]


async def deliver(url: str, hits: list[Hit], token: str) -> BatchSender:
    sender = BatchSender(endpoint=url, access_token=token, batch_size=5)
    async with sender.running_in_background():
        for hit in hits:
            sender.submit(hit)
        assert await sender.aflush(DEADLINE)
    return sender


def test_a_rejected_token_behind_the_queue_is_found_and_every_hit_delivered(
    queued_tracking: tuple[QueuedTracking, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, url = queued_tracking
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    sender = anyio.run(deliver, url, visitor_hits(25), "a-revoked-token")
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.rejected, stats.dropped) == (25, 0, 0)
    assert sorted(element["url"][0] for element in app.queued) == sorted(
        f"https://example.com/{i}" for i in range(25)
    )
    assert not any("cip" in element for element in app.queued)
    # The first batch with the token is refused, its probe without it taken: then
    # the token is known to be rejected and no other request carries it.
    assert 1 <= sum(app.requests) <= 2
    assert "rejected the access_token" in caplog.text
    assert "GIF8" not in caplog.text  # the refusal's bytes are never quoted


def test_the_right_token_behind_the_queue_keeps_the_visitor_ip(
    queued_tracking: tuple[QueuedTracking, str],
) -> None:
    app, url = queued_tracking
    sender = anyio.run(deliver, url, visitor_hits(10), GOOD_TOKEN)
    assert not sender.stats.token_rejected
    assert sender.stats.sent == 10
    assert sorted(element["cip"][0] for element in app.queued) == sorted(
        f"203.0.113.{i}" for i in range(10)
    )


def test_a_refusal_that_is_not_the_tokens_is_described_not_quoted(
    queued_tracking: tuple[QueuedTracking, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, url = queued_tracking
    app.refuse_all = True
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    sender = anyio.run(deliver, url, visitor_hits(5), GOOD_TOKEN)
    # Refused with the token and without it: the token is not to blame.
    assert not sender.stats.token_rejected
    assert sender.stats.rejected == 5
    assert app.requests == [True, False]
    refusals = [r.getMessage() for r in caplog.records if "refused a batch" in r.getMessage()]
    assert refusals == [
        "asgi_matomo: Matomo refused a batch of 5 hits with HTTP 400: image/gif, 43 bytes "
        "(not retried; logged once per distinct answer)"
    ]
    assert "GIF8" not in caplog.text
