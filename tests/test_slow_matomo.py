"""The sender against a Matomo too slow to answer a default-sized batch in time, over real sockets.

The stand-in runs under uvicorn on loopback and handles one bulk request at a
time, taking a fixed time per hit, and stores a batch even when the sender
stopped waiting for it (as PHP goes on after the client left). The sender runs
in the test's event loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest

from asgi_matomo._hit import Hit
from asgi_matomo._sender import BatchSender
from tests.threaded_server import read_body, serve_in_thread

pytestmark = pytest.mark.slow

DEADLINE = 60.0
PER_HIT = 0.02  # seconds: a batch of 100 takes 2 s, twice the timeout below
HTTP_TIMEOUT = 1.0


@dataclass
class SerialMatomo:
    """An ASGI app: one bulk at a time, PER_HIT seconds per hit; records what it stored."""

    stored: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        assert scope["type"] == "http"
        body = await read_body(receive)
        requests = json.loads(body)["requests"]
        self.sizes.append(len(requests))
        async with self.lock:
            with anyio.CancelScope(shield=True):  # stored even when the client left
                await anyio.sleep(PER_HIT * len(requests))
                self.stored += requests
        answer = json.dumps({"status": "success", "tracked": len(requests), "invalid": 0})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer.encode()})


@pytest.fixture
def serial_matomo() -> Iterator[tuple[SerialMatomo, str]]:
    app = SerialMatomo()
    with serve_in_thread(app, timeout=DEADLINE, log_level="critical") as url:
        yield app, url


def test_batches_that_time_out_are_resent_smaller_until_matomo_answers_in_time(
    serial_matomo: tuple[SerialMatomo, str],
) -> None:
    app, url = serial_matomo
    now = time.time()
    hits = [Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now) for i in range(200)]
    sender = BatchSender(
        endpoint=url, http_timeout=HTTP_TIMEOUT, retry_deadline=20.0, shutdown_timeout=0.0
    )

    async def main() -> None:
        async with sender.running_in_background():
            for hit in hits:
                sender.submit(hit)
            assert await sender.aflush(DEADLINE)

    anyio.run(main)
    # Before, a timeout reset the batch size to 100 and the batch was resent whole:
    # every attempt timed out, and all 200 hits were dropped (though stored, many times).
    assert sender.stats.sent == 200
    assert sender.stats.dropped == 0
    assert set(app.stored) == {h.encode(authenticated=False) for h in hits}
    assert min(app.sizes) < 100
