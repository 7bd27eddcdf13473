"""The batch sender: queueing, bulk requests, retries, token fallback, spool, lifecycle."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import itertools
import json
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn
from unittest import mock
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel
import httpx
import pytest

from asgi_matomo import _report, _retry, _sender, _token, _transport
from asgi_matomo._bulk import parse_retry_after
from asgi_matomo._hit import UNAUTHENTICATED_MAX_AGE, Hit
from asgi_matomo._retry import RETRY_AFTER_CAP, RETRY_AFTER_JITTER, RETRY_BASE, RETRY_CAP
from asgi_matomo._sender import (
    DEFAULT_BATCH_SIZE,
    BatchSender,
    Stats,
)
from asgi_matomo._spool import SqliteSpool

ENDPOINT = "https://matomo.example.com/matomo.php"
TOKEN = "s3cr3t-token-0123456789abcdef"
GOOD_TOKEN = "g00d-token-0123456789abcdef"
# Hits are stamped "now" (whole seconds, for HTTP dates): older than 24 h needs a token.
NOW = float(int(time.time()))
DEADLINE = 10  # seconds a test may wait for a condition before it fails


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def hit(n: int, *, cip: str | None = None, timestamp: float | None = None) -> Hit:
    return Hit(
        query=f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{n}",
        timestamp=NOW + n if timestamp is None else timestamp,
        cip=cip,
    )


def numbers(requests: Sequence[str]) -> list[int]:
    """The `n` of each hit() in a bulk body's `requests`, in order."""
    return [int(dict(parse_qsl(r[1:]))["url"].rsplit("/", 1)[1]) for r in requests]


class Matomo:
    """A fake Matomo behind httpx.MockTransport: records bodies, answers with `answer`."""

    def __init__(self, answer: Callable[[dict[str, Any]], httpx.Response] | None = None) -> None:
        self.answer = answer or success
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.gate: anyio.Event | None = None  # set to hold requests until it is set
        self._changed: anyio.Event | None = None

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(request)
        self.bodies.append(body)
        self._notify()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self.answer(body)
        finally:
            self.active -= 1

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(self, n: int) -> None:
        """Wait until `n` requests arrived (with a deadline)."""
        with anyio.fail_after(DEADLINE):
            while len(self.bodies) < n:
                self._changed = event = anyio.Event()
                await event.wait()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(self.handler)) as client:
            yield client

    @property
    def hits(self) -> list[int]:
        return [n for body in self.bodies for n in numbers(body["requests"])]


def success(body: dict[str, Any]) -> httpx.Response:
    n = len(body["requests"])
    return httpx.Response(200, json={"status": "success", "tracked": n, "invalid": 0})


def matomo_with_token(valid: str | None) -> Callable[[dict[str, Any]], httpx.Response]:
    """Matomo 5.1's bulk answer: with a bad token, elements carrying cip are invalid."""

    def answer(body: dict[str, Any]) -> httpx.Response:
        ok = valid is not None and body.get("token_auth") == valid
        invalid = 0 if ok else sum("&cip=" in r for r in body["requests"])
        tracked = len(body["requests"]) - invalid
        return httpx.Response(
            200, json={"status": "success", "tracked": tracked, "invalid": invalid}
        )

    return answer


class BruteForceMatomo:
    """Matomo 5.1 with its brute-force protection, as a MockTransport answer.

    The token is accepted for the first `accepted` requests that carry it, then
    wrong (revoked or rotated): elements with cip come back invalid and each
    request with the token is a failed login. After `BLOCK_AFTER` failed logins
    every request with a token gets HTTP 500.
    """

    BLOCK_AFTER = 20

    def __init__(self, accepted: int = 0) -> None:
        self.accepted = accepted
        self.with_token = 0
        self.failed_logins = 0

    def __call__(self, body: dict[str, Any]) -> httpx.Response:
        requests = body["requests"]
        if "token_auth" in body:
            self.with_token += 1
            if self.failed_logins >= self.BLOCK_AFTER:
                return httpx.Response(500, json={"status": "error"})
            if self.with_token <= self.accepted:
                return success(body)
            self.failed_logins += 1
        invalid = sum("&cip=" in r for r in requests)
        return httpx.Response(
            200, json={"status": "success", "tracked": len(requests) - invalid, "invalid": invalid}
        )


def all_invalid(body: dict[str, Any]) -> httpx.Response:
    n = len(body["requests"])
    return httpx.Response(200, json={"status": "success", "tracked": 0, "invalid": n})


class FakeClock:
    """Monotonic time that moves only when the sender sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class EndlessSleep:
    """A backoff sleep that only ends when it is cancelled: a long backoff, frozen."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await anyio.Event().wait()


class FakeSpool:
    """An in-memory SpoolProtocol with leases, like the SQLite one."""

    def __init__(self, hits: Sequence[Hit] = (), *, evict: int = 0) -> None:
        self.rows: dict[int, Hit] = {}
        self.leased: set[int] = set()
        self.next_id = 1
        self.closed = False
        self.evict = evict
        self.fail: set[str] = set()  # method names that raise
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._store(hits)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise OSError(f"spool {name} failed")

    def put(self, hits: Sequence[Hit]) -> int | None:
        self._call("put")
        self._store(hits)
        return self.evict or None

    def _store(self, hits: Sequence[Hit]) -> None:
        with self._lock:
            for h in hits:
                self.rows[self.next_id] = h
                self.next_id += 1

    def claim(self, limit: int) -> list[tuple[int, Hit]]:
        self._call("claim")
        with self._lock:
            free = [i for i in sorted(self.rows) if i not in self.leased][:limit]
            self.leased.update(free)
            return [(i, self.rows[i]) for i in free]

    def ack(self, ids: Sequence[int]) -> None:
        self._call("ack")
        with self._lock:
            for i in ids:
                self.rows.pop(i, None)
                self.leased.discard(i)

    def release(self, ids: Sequence[int]) -> None:
        self._call("release")
        with self._lock:
            self.leased.difference_update(ids)

    def count(self) -> int:
        self._call("count")
        return len(self.rows)

    def close(self) -> None:
        self._call("close")
        self.closed = True


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, letting other tasks run (with a deadline)."""
    with anyio.fail_after(DEADLINE):
        while not condition():
            await anyio.sleep(0)


def check_books(stats: Stats) -> None:
    """Every submitted hit is in exactly one place (no spool replay involved)."""
    assert stats.submitted == (
        stats.queued
        + stats.in_flight
        + stats.sent
        + stats.invalid
        + stats.rejected
        + stats.dropped
        + stats.spooled
    )


def sender_for(client: Any, **options: Any) -> BatchSender:
    options.setdefault("flush_interval", 3600.0)
    return BatchSender(endpoint=ENDPOINT, client=client, **options)


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("http_timeout", 0, "http_timeout must be > 0, got 0"),
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("flush_interval", -1.0, "flush_interval must be > 0, got -1.0"),
        ("max_queue_size", 0, "max_queue_size must be >= 1, got 0"),
        ("max_concurrent_batches", 0, "max_concurrent_batches must be >= 1, got 0"),
        ("retry_deadline", -0.5, "retry_deadline must be >= 0, got -0.5"),
        ("shutdown_timeout", float("nan"), "shutdown_timeout must be >= 0, got nan"),
    ],
)
def test_numbers_are_validated(name: str, value: object, message: str) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=f"^{message}$"):
        BatchSender(endpoint=ENDPOINT, **kwargs)


@pytest.mark.parametrize(
    ("name", "value"),
    [("batch_size", 1.5), ("batch_size", True), ("http_timeout", "5"), ("access_token", 42)],
)
def test_types_are_validated(name: str, value: object) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(TypeError, match=f"^{name} must be"):
        BatchSender(endpoint=ENDPOINT, **kwargs)


@pytest.mark.parametrize("endpoint", ["", "matomo.example.com/matomo.php", None])
def test_endpoint_must_be_an_http_url(endpoint: Any) -> None:
    with pytest.raises(ValueError, match="endpoint must be an http"):
        BatchSender(endpoint=endpoint)


def test_defaults_are_exported() -> None:
    sender = BatchSender(endpoint=ENDPOINT)
    assert sender._batch_size == DEFAULT_BATCH_SIZE == 1000
    assert sender._controller.batch == 100  # where the adaptive limit starts
    assert not sender.running
    # The adaptive limits start at 4 batches of up to 100 hits, and stats show them.
    assert sender.stats == Stats(concurrency=4, batch_size=100)
    sender._controller.too_large(60)
    assert sender.stats.batch_size == 30
    assert not sender.force_flush()


# -- batching ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batches_by_size_oldest_first() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=3)
        running = [sender.running]
        async with sender.running_in_background():
            running.append(sender.running)
            for n in range(7):
                sender.submit(hit(n))
            await matomo.wait_for(2)
            assert [numbers(b["requests"]) for b in matomo.bodies] == [[0, 1, 2], [3, 4, 5]]
            # The seventh waits for its interval (an hour here) or a flush.
            assert sender.stats.queued == 1
            assert await sender.aflush(DEADLINE)
            assert matomo.hits == list(range(7))
        running.append(sender.running)
    assert running == [False, True, False]
    stats = sender.stats
    assert (stats.sent, stats.batches, stats.queued, stats.in_flight) == (7, 3, 0, 0)
    check_books(stats)


@pytest.mark.anyio
async def test_batches_by_interval() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=100, flush_interval=0.01)
        async with sender.running_in_background():
            sender.submit(hit(0))
            sender.submit(hit(1))
            await matomo.wait_for(1)
            sender.submit(hit(2))
            await matomo.wait_for(2)
    assert [numbers(b["requests"]) for b in matomo.bodies] == [[0, 1], [2]]


@pytest.mark.anyio
async def test_bulk_request_shape() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            sender.submit(hit(1))
    (request,) = matomo.requests
    assert request.method == "POST"
    assert str(request.url) == ENDPOINT
    assert request.headers["content-type"] == "application/json"
    assert matomo.bodies[0] == {
        "requests": [
            hit(0, cip="203.0.113.7").encode(authenticated=True),
            hit(1).encode(authenticated=True),
        ],
        "token_auth": TOKEN,
    }
    assert "&cip=203.0.113.7" in matomo.bodies[0]["requests"][0]


@pytest.mark.anyio
async def test_no_token_no_token_auth_and_no_cip() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, access_token="")  # an unset environment variable
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
    assert matomo.bodies == [{"requests": [hit(0).encode(authenticated=False)]}]


@pytest.mark.anyio
async def test_bounded_queue_drops_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, max_queue_size=2)
        async with sender.running_in_background():
            with caplog.at_level(logging.WARNING, "asgi_matomo"):
                for n in range(5):
                    sender.submit(hit(n))
            assert sender.stats.queued == 2
            assert sender.stats.dropped == 3
    assert matomo.hits == [0, 1]
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1
    assert "queue is full" in warnings_[0].getMessage()
    check_books(sender.stats)


@pytest.mark.anyio
async def test_concurrent_batches_are_bounded() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=1, max_concurrent_batches=2)
        async with sender.running_in_background():
            for n in range(5):
                sender.submit(hit(n))
            await matomo.wait_for(2)
            stats = sender.stats
            assert (stats.in_flight, stats.queued) == (2, 3)
            matomo.gate.set()
            assert await sender.aflush(DEADLINE)
    assert matomo.max_active == 2
    assert sorted(matomo.hits) == list(range(5))
    assert sender.stats.sent == 5


@pytest.mark.anyio
async def test_queue_grows_into_full_batches_while_slots_are_busy() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=3, max_concurrent_batches=1, flush_interval=0.001)
        async with sender.running_in_background():
            sender.submit(hit(0))
            await matomo.wait_for(1)
            for n in range(1, 5):
                sender.submit(hit(n))
            matomo.gate.set()
            await matomo.wait_for(3)
    assert [numbers(b["requests"]) for b in matomo.bodies] == [[0], [1, 2, 3], [4]]


@pytest.mark.anyio
async def test_aflush_times_out_while_matomo_hangs() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
            assert not await sender.aflush(0.01)
            matomo.gate.set()
            assert await sender.aflush()
    assert sender.stats.sent == 1


@pytest.mark.anyio
async def test_cancelled_send_now_does_not_hold_up_aflush() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background(), anyio.create_task_group() as tg:
            tg.start_soon(sender.send_now, [hit(0)])
            await matomo.wait_for(1)
            assert sender.stats.in_flight == 1
            tg.cancel_scope.cancel()
        assert sender.stats.in_flight == 0


@pytest.mark.anyio
async def test_aflush_returns_when_the_sender_closes() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, shutdown_timeout=0.01)
        async with sender.running_in_background():
            sender.submit(hit(0))
            async with anyio.create_task_group() as tg:
                flushed: list[bool] = []

                async def flush() -> None:
                    flushed.append(await sender.aflush(DEADLINE))

                tg.start_soon(flush)
                await matomo.wait_for(1)
                await sender.aclose()
    assert flushed == [True]
    assert sender.stats.dropped == 1


@pytest.mark.anyio
async def test_aflush_when_not_running_is_trivially_done() -> None:
    assert await BatchSender(endpoint=ENDPOINT).aflush(0)


# -- answers -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(204),
        httpx.Response(204, text="response"),
        httpx.Response(200, content=b"GIF89a\x01\x00", headers={"content-type": "image/gif"}),
        httpx.Response(200, content=b"GIF89a\x01\x00", headers={"content-type": "IMAGE/GIF; x=y"}),
        httpx.Response(200, content=b"GIF89a\x01\x00"),
        httpx.Response(200),
        httpx.Response(202, text=" \r\n"),
    ],
)
async def test_answers_without_counts_mean_success(response: httpx.Response) -> None:
    matomo = Matomo(lambda body: response)
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
            sender.submit(hit(1))
    assert (sender.stats.sent, sender.stats.invalid, sender.stats.retried) == (2, 0, 0)


class _AnswerWithoutHeaders:
    """What a user's client might return: Matomo's counts, and headers that fail."""

    status_code = 200
    text = '{"status":"success","tracked":1,"invalid":0}'

    @property
    def headers(self) -> NoReturn:
        raise RuntimeError("no headers here")


@pytest.mark.anyio
async def test_an_answer_with_counts_needs_no_headers() -> None:
    class Client:
        async def post(self, url: str, **kwargs: Any) -> _AnswerWithoutHeaders:
            return _AnswerWithoutHeaders()

    sender = sender_for(Client())
    async with sender.running_in_background():
        sender.submit(hit(0))
        assert await sender.aflush(DEADLINE)
    assert (sender.stats.sent, sender.stats.dropped, sender.stats.rejected) == (1, 0, 0)


LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html>\n  <head><title>Sign in - Matomo</title></head>\n"
    f'  <body><input value="{TOKEN}"><input value="{TOKEN}">{"x" * 500}</body>\n'
    "</html>"
)


@pytest.mark.anyio
async def test_an_answer_that_is_not_matomos_is_reported_and_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # matomo_url pointing at index.php, a login page or a captive portal: HTTP 200
    # and nothing recorded.
    def answer(body: dict[str, Any]) -> httpx.Response:
        if numbers(body["requests"])[0] < 4:
            return httpx.Response(200, text=LOGIN_PAGE, headers={"content-type": "text/html"})
        return httpx.Response(200, text="OK")

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=2)
        async with sender.running_in_background():
            with caplog.at_level(logging.WARNING, "asgi_matomo"):
                for n in range(6):
                    sender.submit(hit(n, cip="203.0.113.7"))
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert (stats.sent, stats.rejected, stats.retried, stats.batches) == (0, 6, 0, 3)
    assert not stats.token_rejected
    check_books(stats)
    messages = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.ERROR for r in caplog.records)
    # One line per distinct answer, the token masked in the excerpt.
    assert len(messages) == 2
    # Masked before the excerpt is cut: not even the start of a token at the cut.
    assert all(TOKEN[:4] not in m for m in messages)
    html, text = messages
    assert "does not look like Matomo's tracking endpoint" in html
    assert "HTTP 200" in html
    assert "text/html" in html
    assert (
        "answered HTTP 200, text/html: '<!DOCTYPE html> <html> <head><title>Sign in - Matomo"
        '</title></head> <body><input value="***"><input \'. Nothing was recorded'
    ) in html
    assert "x" * 200 not in html
    assert "answered HTTP 200, text/plain; charset=utf-8: 'OK'." in text


async def _send_two_logged(sender: BatchSender, caplog: pytest.LogCaptureFixture) -> None:
    """Two hits through a running sender, flushed, with its warnings captured."""
    async with sender.running_in_background():
        with caplog.at_level(logging.WARNING, "asgi_matomo"):
            sender.submit(hit(0))
            sender.submit(hit(1))
            assert await sender.aflush(DEADLINE)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [["a list"], {"status": "success"}, {"tracked": True}, {"ok": True, "tracked": "2"}],
)
async def test_a_json_answer_without_counts_is_not_matomos(
    answer: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Matomo's bulk answer always carries its counts (QueuedTracking answers 204 or
    # a GIF): JSON without them is some other API, which recorded nothing.
    matomo = Matomo(lambda body: httpx.Response(200, json=answer))
    async with matomo.client() as client:
        sender = sender_for(client)
        await _send_two_logged(sender, caplog)
    stats = sender.stats
    assert (stats.sent, stats.rejected, stats.retried) == (0, 2, 0)
    check_books(stats)
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "does not look like Matomo's tracking endpoint" in record.getMessage()
    assert "application/json" in record.getMessage()


@pytest.mark.anyio
async def test_mock_answers_without_headers(caplog: pytest.LogCaptureFixture) -> None:
    answers = [
        SimpleNamespace(status_code=204, text="response"),
        SimpleNamespace(status_code=200, text=""),
        SimpleNamespace(status_code=200, text=None),
        SimpleNamespace(status_code=200, text="<html>login</html>"),
    ]
    client = mock.AsyncMock(httpx.AsyncClient)
    client.post.side_effect = answers
    sender = sender_for(client, batch_size=1)
    async with sender.running_in_background():
        with caplog.at_level(logging.ERROR, "asgi_matomo"):
            for n in range(4):
                sender.submit(hit(n))
            assert await sender.aflush(DEADLINE)
    assert (sender.stats.sent, sender.stats.rejected) == (3, 1)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "HTTP 200, no content type: '<html>login</html>'" in message


@pytest.mark.anyio
async def test_invalid_counts_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, json={"status": "success", "tracked": 2, "invalid": 1})

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=3)
        async with sender.running_in_background():
            with caplog.at_level(logging.WARNING, "asgi_matomo"):
                for n in range(6):
                    sender.submit(hit(n))
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert (stats.sent, stats.invalid, stats.retried) == (4, 2, 0)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [
        "asgi_matomo: Matomo counted 1 of 3 hits invalid (wrong idsite? bad parameter?)"
    ]
    check_books(stats)


@pytest.mark.anyio
async def test_elements_matomo_skips_silently_count_as_invalid() -> None:
    # Matomo answers `tracked 0, invalid 0` to a body it cannot parse.
    matomo = Matomo(lambda body: httpx.Response(200, json={"tracked": 0, "invalid": 0}))
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
    assert (sender.stats.sent, sender.stats.invalid) == (0, 1)


@pytest.mark.anyio
async def test_client_errors_are_not_retried_and_logged_once_per_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        n = numbers(body["requests"])[0]
        text = "<html>\n  Bad   request</html>" if n < 2 else f"Unknown site {TOKEN}"
        return httpx.Response(400, text=text)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=1, access_token=TOKEN)
        async with sender.running_in_background():
            with caplog.at_level(logging.ERROR, "asgi_matomo"):
                for n in range(4):
                    sender.submit(hit(n))
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert (stats.rejected, stats.retried, stats.batches) == (4, 0, 4)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert messages == [
        "asgi_matomo: Matomo refused a batch of 1 hits with HTTP 400: <html> Bad request</html> "
        "(not retried; logged once per distinct answer)",
        "asgi_matomo: Matomo refused a batch of 1 hits with HTTP 400: Unknown site *** "
        "(not retried; logged once per distinct answer)",
    ]
    check_books(stats)


@pytest.mark.anyio
async def test_a_redirect_is_reported_with_its_target(caplog: pytest.LogCaptureFixture) -> None:
    target = "https://matomo.example.com/new/matomo.php"
    matomo = Matomo(lambda body: httpx.Response(301, headers={"Location": target}))
    async with matomo.client() as client:
        sender = sender_for(client)
        with caplog.at_level(logging.ERROR, "asgi_matomo"):
            async with sender.running_in_background():
                sender.submit(hit(0))
    assert sender.stats.rejected == 1
    assert f"HTTP 301: redirected to {target}: use that URL" in caplog.records[0].getMessage()


@pytest.mark.anyio
async def test_a_batch_too_large_is_split(caplog: pytest.LogCaptureFixture) -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        if len(body["requests"]) > 2:
            return httpx.Response(413, text="Request Entity Too Large")
        return success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=5)
        with caplog.at_level(logging.WARNING, "asgi_matomo"):
            async with sender.running_in_background():
                for n in range(5):
                    sender.submit(hit(n))
    sizes = [len(b["requests"]) for b in matomo.bodies]
    assert sizes == [5, 2, 3, 1, 2]
    accepted = [numbers(b["requests"]) for b in matomo.bodies if len(b["requests"]) <= 2]
    assert accepted == [[0, 1], [2], [3, 4]]
    assert (sender.stats.sent, sender.stats.rejected) == (5, 0)
    assert len(caplog.records) == 1
    assert "HTTP 413" in caplog.records[0].getMessage()
    check_books(sender.stats)


@pytest.mark.anyio
async def test_a_split_batch_cut_off_at_shutdown_spools_only_what_was_not_delivered() -> None:
    # The first half is delivered, the second hangs until aclose() gives up on it:
    # only the second half may go to the spool (the first would be stored twice).
    arrived = anyio.Event()
    hold = anyio.Event()  # never set

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if len(body["requests"]) > 2:
            return httpx.Response(413)
        if numbers(body["requests"])[0] == 4:
            arrived.set()
            await hold.wait()
        return success(body)

    spool = FakeSpool()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sender = sender_for(client, batch_size=8, shutdown_timeout=0.0, spool=spool)
        async with sender.running_in_background():
            # 8 -> 4 + 4 -> (2 + 2) + (2 + 2): the third pair hangs.
            for n in range(8):
                sender.submit(hit(n))
            sender.force_flush()
            with anyio.fail_after(DEADLINE):
                await arrived.wait()
    spooled = sorted(numbers([h.encode(authenticated=False) for h in spool.rows.values()]))
    assert spooled == [4, 5, 6, 7]
    assert (sender.stats.sent, sender.stats.spooled) == (4, 4)
    check_books(sender.stats)


@pytest.mark.anyio
async def test_a_single_hit_too_large_is_refused() -> None:
    matomo = Matomo(lambda body: httpx.Response(413))
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
            sender.submit(hit(1))
    assert [len(b["requests"]) for b in matomo.bodies] == [2, 1, 1]
    assert sender.stats.rejected == 2


def test_duplicate_filter_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    sender = BatchSender(endpoint=ENDPOINT)
    with caplog.at_level(logging.ERROR, "asgi_matomo"):
        for n in range(_report.MAX_CAUSES + 10):
            sender._reporter.log_once(f"cause {n}", logging.ERROR, "cause %d", n)
    assert len(caplog.records) == _report.MAX_CAUSES


# -- retries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
        ("Wed, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_retry_after_parsing(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def failing(*answers: httpx.Response | Exception) -> Callable[[dict[str, Any]], httpx.Response]:
    """Answers (or raises) each of `answers` once, then succeeds."""
    pending = list(answers)

    def answer(body: dict[str, Any]) -> httpx.Response:
        if pending:
            outcome = pending.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return success(body)

    return answer


@pytest.mark.anyio
async def test_retries_with_backoff_until_success() -> None:
    clock = FakeClock()
    matomo = Matomo(
        failing(
            httpx.Response(500, json={"status": "error"}),
            httpx.ConnectError("refused"),
            httpx.ReadTimeout("slow"),
            httpx.Response(502),
            httpx.Response(408),
            httpx.Response(503),
        )
    )
    async with matomo.client() as client:
        sender = sender_for(client, clock=clock, sleep=clock.sleep)
        async with sender.running_in_background():
            sender.submit(hit(0))
            sender.submit(hit(1))
            assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert (stats.sent, stats.retried, stats.batches) == (2, 6, 7)
    # The whole batch again each time: Matomo rolls a failed bulk back.
    assert all(body == matomo.bodies[0] for body in matomo.bodies)
    assert len(clock.sleeps) == 6
    for attempt, delay in enumerate(clock.sleeps, start=1):
        ceiling = min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["7", "date"])
async def test_retry_after_is_honoured(header: str) -> None:
    clock = FakeClock()
    value = "7" if header == "7" else email.utils.formatdate(NOW + 7, usegmt=True)
    matomo = Matomo(failing(httpx.Response(429, headers={"Retry-After": value})))
    async with matomo.client() as client:
        sender = sender_for(client, clock=clock, sleep=clock.sleep, wall_clock=lambda: NOW)
        async with sender.running_in_background():
            sender.submit(hit(0))
    # Waited what Matomo asked for, and up to a fifth more (jitter).
    assert len(clock.sleeps) == 1
    assert 7.0 <= clock.sleeps[0] <= 7.0 * (1 + RETRY_AFTER_JITTER)
    assert sender.stats.sent == 1


@pytest.mark.anyio
async def test_timeout_of_a_hanging_client_is_retried() -> None:
    clock = FakeClock()
    calls = 0

    async def post(url: str, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep_forever()
        return SimpleNamespace(status_code=204, text="")

    client = SimpleNamespace(post=post)
    sender = sender_for(client, http_timeout=0.01, clock=clock, sleep=clock.sleep)
    async with sender.running_in_background():
        sender.submit(hit(0))
    assert (sender.stats.sent, sender.stats.retried, sender.stats.batches) == (1, 1, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("with_spool", [True, False])
async def test_retry_deadline_then_spool_or_drop(
    with_spool: bool, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    spool = FakeSpool() if with_spool else None
    matomo = Matomo(lambda body: httpx.Response(503))
    async with matomo.client() as client:
        sender = sender_for(
            client, clock=clock, sleep=clock.sleep, retry_deadline=60.0, spool=spool
        )
        await _send_two_logged(sender, caplog)
    stats = sender.stats
    assert sum(clock.sleeps) <= 60.0
    assert stats.retried == len(clock.sleeps) >= 3
    if spool is not None:
        assert stats.spooled == 2
        assert stats.dropped == 0
        assert list(spool.rows.values()) == [hit(0), hit(1)]
        assert spool.closed
    else:
        assert stats.dropped == 2
        assert stats.spooled == 0
    check_books(stats)
    messages = [r.getMessage() for r in caplog.records]
    assert "asgi_matomo: Matomo unavailable (HTTP 503): retrying" in messages
    # Rate limited: one line per kind, not one per attempt.
    assert len(messages) == len(set(messages))


def test_throttle_counts_suppressed_lines() -> None:
    now = [0.0]
    throttle = _report.Throttle(lambda: now[0], interval=60.0)
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None
    assert throttle.allow("other") == 0
    assert throttle.allow("k") is None
    now[0] = 61.0
    assert throttle.allow("k") == 2


def test_warn_mentions_suppressed_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sender = BatchSender(endpoint=ENDPOINT, clock=clock)
    with caplog.at_level(logging.WARNING, "asgi_matomo"):
        for _ in range(3):
            sender._reporter.drop(1, "x", "because")
        clock.now += _report.LOG_INTERVAL
        sender._reporter.drop(1, "x", "because")
    assert [r.getMessage() for r in caplog.records] == [
        "asgi_matomo: dropped 1 hits: because",
        "asgi_matomo: dropped 1 hits: because (2 similar messages suppressed)",
    ]
    assert sender.stats.dropped == 4


# -- the token -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_token_is_never_logged_nor_in_a_url(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    matomo = Matomo(
        failing(
            httpx.Response(500, text=f"error {TOKEN}"),
            httpx.ConnectError(f"boom {TOKEN}"),
            httpx.Response(400, text=f"bad token_auth={TOKEN}"),
        )
    )
    caplog.set_level(logging.DEBUG)
    async with matomo.client() as client:
        sender = sender_for(
            client, access_token=TOKEN, clock=clock, sleep=clock.sleep, batch_size=1
        )
        async with sender.running_in_background():
            for n in range(3):
                sender.submit(hit(n, cip="203.0.113.7"))
    assert caplog.records
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    for request in matomo.requests:
        assert TOKEN not in str(request.url)
        assert TOKEN not in str(request.headers)
    # The 400 to a batch with the token is probed without it (QueuedTracking's answer).
    assert {body.get("token_auth") for body in matomo.bodies} == {TOKEN, None}
    assert TOKEN not in repr(sender)


@pytest.mark.anyio
async def test_rejected_token_is_detected_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    matomo = Matomo(matomo_with_token(valid=GOOD_TOKEN))
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=3)
        async with sender.running_in_background():
            with caplog.at_level(logging.WARNING, "asgi_matomo"):
                for n in range(9):
                    sender.submit(hit(n, cip="203.0.113.7" if n != 1 else None))
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert (stats.sent, stats.invalid, stats.dropped) == (9, 0, 0)
    assert stats.token_rejected
    # One request with the bad token, then never again: Matomo counts each as a
    # failed login and blocks the IP after about 20.
    assert [("token_auth" in b) for b in matomo.bodies] == [True, False, False, False]
    # The resend carries only the hits that needed the token (hit 1 had no cip and
    # was tracked the first time), without cip.
    assert numbers(matomo.bodies[1]["requests"]) == [0, 2]
    assert all("cip=" not in r for b in matomo.bodies[1:] for r in b["requests"])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Matomo rejected the access_token" in errors[0]
    assert "write access" in errors[0]
    check_books(stats)


@pytest.mark.anyio
async def test_batches_in_flight_when_the_token_is_revoked_are_resent() -> None:
    resent = anyio.Event()
    second_sent = anyio.Event()
    bodies: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        n = numbers(body["requests"])[0]
        if "token_auth" not in body:
            if n == 1:
                resent.set()
            return success(body)
        if n == 0:  # the token is good at first
            return success(body)
        if n == 1:  # then revoked, while hit 2 is on its way with the token too
            await second_sent.wait()
            return httpx.Response(403)
        second_sent.set()
        await resent.wait()
        return all_invalid(body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=1)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
            sender.submit(hit(1, cip="203.0.113.7"))
            sender.submit(hit(2, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
    assert [(numbers(b["requests"]), "token_auth" in b) for b in bodies] == [
        ([0], True),
        ([1], True),
        ([2], True),
        ([1], False),
        ([2], False),
    ]
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.invalid) == (3, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_http_401_403_with_token_means_rejected_token(status: int) -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        if "token_auth" in body:
            return httpx.Response(status, text="Forbidden")
        return success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            sender.submit(hit(1))
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.rejected, stats.batches) == (2, 0, 2)


@pytest.mark.anyio
async def test_lockout_500s_with_the_token_are_detected() -> None:
    # Matomo 5.1 answers HTTP 500 to authenticated bulk requests from a blocked IP.
    clock = FakeClock()

    def answer(body: dict[str, Any]) -> httpx.Response:
        if "token_auth" in body:
            return httpx.Response(500, json={"status": "error"})
        return success(body)

    old = NOW - UNAUTHENTICATED_MAX_AGE - 1
    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(
            client, access_token=TOKEN, clock=clock, sleep=clock.sleep, wall_clock=lambda: NOW
        )
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            sender.submit(hit(1, timestamp=old))
            sender.submit(hit(2))
            assert await sender.aflush(DEADLINE)
            sender.submit(hit(3, cip="203.0.113.7"))
    assert [("token_auth" in b) for b in matomo.bodies] == [True, True, False, False]
    assert numbers(matomo.bodies[2]["requests"]) == [0, 2]
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.dropped, stats.retried) == (3, 1, 1)
    check_books(stats)


@pytest.mark.anyio
async def test_lockout_of_a_verified_token_is_detected() -> None:
    # Verified, then this server's IP is blocked (failed logins of another process
    # with the revoked token): HTTP 500 with the token, fine without it.
    clock = FakeClock()
    blocked = False

    def answer(body: dict[str, Any]) -> httpx.Response:
        if "token_auth" in body and blocked:
            return httpx.Response(500, json={"status": "error"})
        return success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, clock=clock, sleep=clock.sleep)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
            assert sender._tokens.state is _token.TokenState.VERIFIED
            blocked = True
            sender.submit(hit(1, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
            sender.submit(hit(2, cip="203.0.113.7"))
    assert [(numbers(b["requests"]), "token_auth" in b) for b in matomo.bodies] == [
        ([0], True),
        ([1], True),
        ([1], True),
        ([1], False),
        ([2], False),
    ]
    assert sender.stats.token_rejected
    assert (sender.stats.sent, sender.stats.dropped) == (3, 0)


@pytest.mark.anyio
async def test_lockout_probes_of_a_verified_token_are_rate_limited() -> None:
    # Matomo down for everyone after the token was verified: a request without the
    # token now and then, not one per attempt.
    clock = FakeClock()
    down = False
    without_token_at: list[float] = []

    def answer(body: dict[str, Any]) -> httpx.Response:
        if not down:
            return success(body)
        if "token_auth" not in body:
            without_token_at.append(clock.now)
        return httpx.Response(500, headers={"Retry-After": "10"})

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(
            client, access_token=TOKEN, clock=clock, sleep=clock.sleep, retry_deadline=300.0
        )
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
            down = True
            start = clock.now
            sender.submit(hit(1, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
    # The first after two 5xx answers (the first retry waits Retry-After, at least),
    # then one per LOCKOUT_PROBE_INTERVAL at most, until the retry deadline.
    assert without_token_at[0] - start >= 10.0
    gaps = [b - a for a, b in itertools.pairwise(without_token_at)]
    assert len(gaps) >= 2
    assert all(gap >= _token.LOCKOUT_PROBE_INTERVAL for gap in gaps)
    assert without_token_at[-1] - start <= 300.0
    assert sender._tokens.state is _token.TokenState.VERIFIED
    assert (sender.stats.sent, sender.stats.dropped) == (1, 1)


@pytest.mark.anyio
async def test_matomo_down_for_everyone_keeps_the_token() -> None:
    clock = FakeClock()
    token_answers = [500, 500, 500]

    def answer(body: dict[str, Any]) -> httpx.Response:
        if "token_auth" not in body:
            return httpx.Response(503)
        if token_answers:
            return httpx.Response(token_answers.pop())
        return success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, clock=clock, sleep=clock.sleep)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
    assert [("token_auth" in b) for b in matomo.bodies] == [True, True, False, True, True]
    assert not sender.stats.token_rejected
    assert sender.stats.sent == 1


@pytest.mark.anyio
async def test_no_lockout_probe_when_every_hit_is_too_old() -> None:
    clock = FakeClock()
    old = NOW - UNAUTHENTICATED_MAX_AGE - 1
    answers = [500, 500]
    matomo = Matomo(lambda body: httpx.Response(answers.pop()) if answers else success(body))
    async with matomo.client() as client:
        sender = sender_for(
            client, access_token=TOKEN, clock=clock, sleep=clock.sleep, wall_clock=lambda: NOW
        )
        async with sender.running_in_background():
            sender.submit(hit(0, timestamp=old))
    assert [("token_auth" in b) for b in matomo.bodies] == [True, True, True]
    assert sender.stats.sent == 1


@pytest.mark.anyio
async def test_http_403_without_token_is_a_refusal() -> None:
    matomo = Matomo(lambda body: httpx.Response(403))
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
    assert (sender.stats.rejected, sender.stats.token_rejected) == (1, False)


@pytest.mark.anyio
async def test_a_verified_token_is_rechecked_but_kept_when_the_hits_are_wrong() -> None:
    valid = matomo_with_token(valid=TOKEN)
    calls = 0

    def answer(body: dict[str, Any]) -> httpx.Response:
        nonlocal calls
        calls += 1
        return valid(body) if calls == 1 else all_invalid(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=1)
        async with sender.running_in_background():
            for n in range(3):
                sender.submit(hit(n, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
    # Verified, then every hit invalid: checked without the token, invalid there
    # too, so the token is not to blame and is still sent (batches 1 and 2 in any order).
    assert sorted((numbers(b["requests"]), "token_auth" in b) for b in matomo.bodies) == [
        ([0], True),
        ([1], False),
        ([1], True),
        ([2], False),
        ([2], True),
    ]
    assert not sender.stats.token_rejected
    assert (sender.stats.sent, sender.stats.invalid) == (1, 2)


@pytest.mark.anyio
async def test_all_invalid_with_and_without_token_blames_idsite(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matomo = Matomo(all_invalid)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=1)
        async with sender.running_in_background():
            with caplog.at_level(logging.ERROR, "asgi_matomo"):
                for n in range(6):
                    sender.submit(hit(n, cip="203.0.113.7"))
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert not stats.token_rejected
    assert (stats.sent, stats.invalid) == (0, 6)
    # A few probes without the token, then the token is kept for good.
    with_token = [("token_auth" in b) for b in matomo.bodies]
    assert with_token.count(False) == _token.TOKEN_PROBES
    assert with_token[-1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "idsite" in errors[0]
    check_books(stats)


@pytest.mark.anyio
async def test_inconclusive_probe_keeps_the_token() -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        if "token_auth" in body:
            return all_invalid(body)
        return httpx.Response(200, json={"tracked": 1, "invalid": 1})

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            sender.submit(hit(1, cip="203.0.113.7"))
    assert sender._tokens.state is _token.TokenState.UNKNOWN
    assert (sender.stats.sent, sender.stats.invalid) == (1, 1)


@pytest.mark.anyio
async def test_a_token_revoked_after_it_was_verified_is_noticed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    fake = BruteForceMatomo(accepted=3)
    matomo = Matomo(fake)
    async with matomo.client() as client:
        sender = sender_for(
            client,
            access_token=TOKEN,
            batch_size=5,
            max_concurrent_batches=4,
            clock=clock,
            sleep=clock.sleep,
        )
        async with sender.running_in_background():
            with caplog.at_level(logging.ERROR, "asgi_matomo"):
                for n in range(15):
                    sender.submit(hit(n, cip="203.0.113.7"))
                assert await sender.aflush(DEADLINE)
                assert sender._tokens.state is _token.TokenState.VERIFIED
                # Confirmed: batches now go side by side. Then the token is revoked.
                matomo.gate = anyio.Event()
                for n in range(15, 200):
                    sender.submit(hit(n, cip="203.0.113.7"))
                await matomo.wait_for(3 + 4)
                matomo.gate.set()
                assert await sender.aflush(DEADLINE)
    stats = sender.stats
    assert stats.token_rejected
    # Only the batches already on their way with the token when it was revoked;
    # the others wait for the verdict of the first one's probe.
    assert fake.failed_logins <= 4
    assert (stats.sent, stats.invalid, stats.dropped, stats.rejected) == (200, 0, 0, 0)
    tracked_with_cip = {
        n for body in matomo.bodies[: fake.accepted] for n in numbers(body["requests"])
    }
    assert tracked_with_cip == set(range(15))
    # Everything else went without the token, and so without cip.
    later = [b for b in matomo.bodies if "token_auth" not in b]
    assert all("cip=" not in r for b in later for r in b["requests"])
    assert {n for b in later for n in numbers(b["requests"])} == set(range(15, 200))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Matomo rejected the access_token" in errors[0]
    check_books(stats)


@pytest.mark.anyio
async def test_batches_wait_for_the_verdict_on_a_verified_token_in_doubt() -> None:
    fake = BruteForceMatomo(accepted=1)
    probing = anyio.Event()
    verdict = anyio.Event()
    bodies: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if "token_auth" not in body:
            probing.set()
            await verdict.wait()
        return fake(body)

    def waiting_for_the_token_lock() -> int:
        assert sender._delivery.token_lock is not None
        return sender._delivery.token_lock[1].statistics().tasks_waiting

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=1)
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            assert await sender.aflush(DEADLINE)
            sender.submit(hit(1, cip="203.0.113.7"))  # revoked: all invalid, then a probe
            sender.force_flush()
            with anyio.fail_after(DEADLINE):
                await probing.wait()
            sender.submit(hit(2, cip="203.0.113.7"))
            sender.force_flush()
            await until(lambda: waiting_for_the_token_lock() == 1 or len(bodies) > 3)
            assert len(bodies) == 3  # hit 2 waits for the verdict, not another failed login
            verdict.set()
            assert await sender.aflush(DEADLINE)
    assert [(numbers(b["requests"]), "token_auth" in b) for b in bodies] == [
        ([0], True),
        ([1], True),
        ([1], False),
        ([2], False),
    ]
    assert fake.failed_logins == 1
    assert sender.stats.token_rejected
    assert (sender.stats.sent, sender.stats.invalid) == (3, 0)


@pytest.mark.anyio
async def test_the_token_goes_only_with_batches_that_need_it() -> None:
    # A wrong token and hits without cip (an app on a unix socket: no client
    # address): sending the token would be a failed login per batch for nothing.
    fake = BruteForceMatomo()
    matomo = Matomo(fake)
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=2, wall_clock=lambda: NOW)
        async with sender.running_in_background():
            for n in range(60):
                sender.submit(hit(n))
            assert await sender.aflush(DEADLINE)
            assert (len(matomo.bodies), fake.with_token) == (30, 0)
            assert sender.stats.sent == 60
            assert not sender.stats.token_rejected
            # A hit with cip needs it, and finds out it is wrong.
            sender.submit(hit(60, cip="203.0.113.7"))
            sender.submit(hit(61))
    assert [("token_auth" in b) for b in matomo.bodies[30:]] == [True, False]
    assert fake.failed_logins == 1
    stats = sender.stats
    assert stats.token_rejected
    assert (stats.sent, stats.invalid, stats.dropped) == (62, 0, 0)
    check_books(stats)


@pytest.mark.anyio
@pytest.mark.parametrize(("hours", "with_token"), [(22.5, False), (23.5, True), (25, True)])
async def test_the_token_goes_with_hits_close_to_needing_it_for_their_age(
    hours: float, with_token: bool
) -> None:
    matomo = Matomo(matomo_with_token(valid=TOKEN))
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, wall_clock=lambda: NOW)
        async with sender.running_in_background():
            sender.submit(hit(0, timestamp=NOW - hours * 3600))
            sender.submit(hit(1))
    assert [("token_auth" in b) for b in matomo.bodies] == [with_token]
    assert sender.stats.sent == 2


@pytest.mark.anyio
async def test_old_hits_without_a_valid_token_are_dropped() -> None:
    matomo = Matomo()
    old = NOW - UNAUTHENTICATED_MAX_AGE - 1
    async with matomo.client() as client:
        sender = sender_for(client, wall_clock=lambda: NOW)
        async with sender.running_in_background():
            sender.submit(hit(0, timestamp=old))
            sender.submit(hit(1))
            sender.submit(hit(2, timestamp=old))
            assert await sender.aflush(DEADLINE)
            sender.submit(hit(3, timestamp=old))
    assert matomo.hits == [1]
    assert (sender.stats.sent, sender.stats.dropped) == (1, 3)
    check_books(sender.stats)


@pytest.mark.anyio
async def test_authenticated_batches_go_one_at_a_time_until_the_token_is_confirmed() -> None:
    matomo = Matomo(matomo_with_token(valid=TOKEN))
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN, batch_size=1, max_concurrent_batches=4)
        async with sender.running_in_background():
            for n in range(3):
                sender.submit(hit(n, cip="203.0.113.7"))
            await matomo.wait_for(1)
            await until(lambda: sender.stats.in_flight == 3)
            # All three taken, two wait for the first answer.
            assert len(matomo.bodies) == 1
            matomo.gate.set()
            assert await sender.aflush(DEADLINE)
            # Confirmed: now batches run side by side.
            matomo.gate = anyio.Event()
            for n in range(3, 6):
                sender.submit(hit(n, cip="203.0.113.7"))
            sender.force_flush()
            await matomo.wait_for(6)
            matomo.gate.set()
    assert matomo.max_active == 3
    assert sender.stats.sent == 6


@pytest.mark.anyio
async def test_direct_mode_sends_an_unconfirmed_token_one_request_at_a_time() -> None:
    matomo = Matomo(matomo_with_token(valid=GOOD_TOKEN))
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, access_token=TOKEN)
        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(sender.send_now, [hit(n, cip="203.0.113.7")])
            await matomo.wait_for(1)
            # As many requests send as the limit allows; the last one's hit waits for them.
            await until(lambda: sender.stats.in_flight == 4)
            assert sender.stats.queued == 1
            assert len(matomo.bodies) == 1
            matomo.gate.set()
    # One request with the wrong token, the resend without it, then no token at all.
    assert [("token_auth" in b) for b in matomo.bodies] == [True] + [False] * 5
    # The requests that waited for the verdict go one at a time; the hit that waited
    # in the queue goes beside them, without the token.
    assert matomo.max_active <= 2
    assert sender.stats.sent == 5
    assert sender.stats.token_rejected


# -- clients -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_user_client_is_not_closed() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client)
        async with sender.running_in_background():
            sender.submit(hit(0))
        assert not client.is_closed
        await sender.send_now([hit(1)])  # closed: dropped
    assert sender.stats.dropped == 1


@pytest.fixture
def owned_clients(monkeypatch: pytest.MonkeyPatch) -> list[httpx.AsyncClient]:
    """Make the sender's own clients talk to a MockTransport; yields them as created."""
    created: list[httpx.AsyncClient] = []
    real = httpx.AsyncClient

    def factory(**kwargs: Any) -> httpx.AsyncClient:
        transport = httpx.MockTransport(lambda request: success(json.loads(request.content)))
        client = real(transport=transport, **kwargs)
        created.append(client)
        return client

    monkeypatch.setattr(httpx, "AsyncClient", factory)
    # On asyncio the sender would use its lean client (tested in test_http.py).
    monkeypatch.setattr(_transport, "_lean_fits", lambda endpoint, loop: False)
    return created


@pytest.mark.anyio
async def test_own_client_is_created_and_closed(owned_clients: list[httpx.AsyncClient]) -> None:
    sender = BatchSender(endpoint=ENDPOINT, http_timeout=2.5)
    async with sender.running_in_background():
        sender.submit(hit(0))
        await sender.send_now([hit(1)])  # same loop: same client
    assert len(owned_clients) == 1
    assert owned_clients[0].is_closed
    assert owned_clients[0].timeout == httpx.Timeout(2.5)
    assert sender.stats.sent == 2


def test_direct_mode_across_event_loops(owned_clients: list[httpx.AsyncClient]) -> None:
    # Starlette's TestClient runs each request in a new event loop.
    sender = BatchSender(endpoint=ENDPOINT)
    anyio.run(sender.send_now, [hit(0)])
    anyio.run(sender.send_now, [hit(1)], backend="trio")
    anyio.run(sender.send_now, [hit(2)])
    # One client per loop, closed by its loop on the way out.
    assert len(owned_clients) == 3
    assert all(c.is_closed for c in owned_clients)
    anyio.run(sender.aclose)
    assert sender.stats.sent == 3


@pytest.mark.anyio
async def test_mock_async_client_pattern() -> None:
    # The documented way to test an app without a Matomo.
    client = mock.AsyncMock(httpx.AsyncClient)
    client.post.return_value = SimpleNamespace(status_code=204, text="")
    sender = sender_for(client, access_token=TOKEN)
    async with sender.running_in_background():
        sender.submit(hit(0, cip="203.0.113.7"))
    await sender.send_now([hit(1)])
    client.post.assert_awaited_once()
    (url,), kwargs = client.post.call_args
    assert url == ENDPOINT
    assert set(kwargs) == {"content", "headers"}
    assert json.loads(kwargs["content"])["token_auth"] == TOKEN
    client.aclose.assert_not_called()
    assert (sender.stats.sent, sender.stats.dropped) == (1, 1)


@pytest.mark.anyio
async def test_a_mock_without_a_status_code_is_a_refusal() -> None:
    client = mock.AsyncMock(httpx.AsyncClient)  # post() returns a MagicMock
    sender = sender_for(client)
    async with sender.running_in_background():
        sender.submit(hit(0))
    assert (sender.stats.rejected, sender.stats.retried) == (1, 0)


@pytest.mark.anyio
async def test_retry_after_read_from_a_plain_dict_or_broken_headers() -> None:
    clock = FakeClock()
    answers = [
        SimpleNamespace(status_code=503, text="", headers={"retry-after": "3"}),
        SimpleNamespace(status_code=503, text=b"bytes", headers=None),
        SimpleNamespace(status_code=204, text=None),
    ]

    async def post(url: str, **kwargs: Any) -> Any:
        return answers.pop(0)

    sender = sender_for(SimpleNamespace(post=post), clock=clock, sleep=clock.sleep)
    async with sender.running_in_background():
        sender.submit(hit(0))
    assert 3.0 <= clock.sleeps[0] <= 3.0 * (1 + RETRY_AFTER_JITTER)
    assert len(clock.sleeps) == 2
    assert sender.stats.sent == 1


# -- direct mode ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_send_now_sends_one_bulk_request() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client)
        await sender.send_now([hit(0), hit(1)])
        await sender.send_now([])
        assert not sender.running
    assert [numbers(b["requests"]) for b in matomo.bodies] == [[0, 1]]
    assert sender.stats.sent == 2
    check_books(sender.stats)


@pytest.mark.anyio
@pytest.mark.parametrize("with_spool", [True, False])
async def test_send_now_retries_a_few_times_then_spools_or_drops(with_spool: bool) -> None:
    clock = FakeClock()
    spool = FakeSpool() if with_spool else None
    matomo = Matomo(lambda body: httpx.Response(500))
    async with matomo.client() as client:
        sender = sender_for(client, clock=clock, sleep=clock.sleep, spool=spool)
        await sender.send_now([hit(0)])
    assert sender.stats.batches == _retry.DIRECT_ATTEMPTS
    assert sum(clock.sleeps) <= sender._http_timeout
    assert (sender.stats.spooled, sender.stats.dropped) == ((1, 0) if with_spool else (0, 1))


@pytest.mark.anyio
async def test_send_now_replays_one_spooled_batch_per_call() -> None:
    spool = FakeSpool([hit(10), hit(11), hit(12)])
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, batch_size=2)
        await sender.send_now([hit(0)])
        assert matomo.hits == [0, 10, 11]
        await sender.send_now([hit(1)])
        await sender.send_now([hit(2)])
    assert matomo.hits == [0, 10, 11, 1, 12, 2]
    assert spool.rows == {}
    assert (sender.stats.replayed, sender.stats.sent) == (3, 6)


async def burst(sender: BatchSender, first: int, n: int) -> None:
    """`n` requests that end at once, each sending one hit in direct mode."""
    async with anyio.create_task_group() as tg:
        for i in range(first, first + n):
            tg.start_soon(sender.send_now, [hit(i)])


@pytest.mark.anyio
async def test_direct_mode_sends_at_most_the_limit_at_once_and_batches_the_rest() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, max_concurrent_batches=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 10)
            await matomo.wait_for(2)
            # The requests that found both slots taken left their hit in the queue and
            # returned: nothing of theirs waits for Matomo.
            await until(lambda: sender.stats.queued == 8)
            assert sender.stats.in_flight == 2
            assert len(matomo.bodies) == 2
            matomo.gate.set()
    assert matomo.max_active == 2
    assert sorted(matomo.hits) == list(range(10))
    # The two sending took the waiting hits in batches before they finished.
    assert len(matomo.bodies) < 10
    assert sender.stats.sent == 10
    check_books(sender.stats)


@pytest.mark.anyio
@pytest.mark.parametrize("with_spool", [True, False])
async def test_direct_mode_bounds_what_waits_then_spools_or_drops(with_spool: bool) -> None:
    spool = FakeSpool() if with_spool else None
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, max_concurrent_batches=1, max_queue_size=3, spool=spool)
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 10)
            await matomo.wait_for(1)
            # 1 sending, 3 in the queue, 3 more on their way to the spool (or dropped
            # without one), the last 3 dropped.
            await until(lambda: sender.stats.submitted == 10)
            stats = sender.stats
            assert (stats.in_flight, stats.queued) == (1, 6 if with_spool else 3)
            assert stats.dropped == (3 if with_spool else 6)
            matomo.gate.set()
    stats = sender.stats
    if spool is None:
        assert (stats.sent, stats.spooled, stats.dropped) == (4, 0, 6)
        check_books(stats)
    else:
        # The spooled hits came back once Matomo took a batch: counted again in sent.
        assert (stats.sent, stats.spooled, stats.replayed, stats.dropped) == (7, 3, 3, 3)
        assert spool.rows == {}
    # Which hits waited depends on the order the tasks ran in (trio shuffles it).
    assert len(set(matomo.hits)) == len(matomo.hits) == (7 if with_spool else 4)


@pytest.mark.anyio
async def test_a_direct_request_past_its_time_takes_what_is_left_once_requests_stop() -> None:
    clock = FakeClock()
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, max_concurrent_batches=1, batch_size=2, clock=clock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 10)
            await matomo.wait_for(1)
            await until(lambda: sender.stats.queued == 9)
            # Its own batch took longer than http_timeout; no request came since.
            clock.now += 60.0
            matomo.gate.set()
    # Nobody else would take what waits: the request sending took it all, 2 by 2.
    assert sender.stats.queued == 0
    assert sorted(matomo.hits) == list(range(10))
    assert len(matomo.bodies) == 1 + 5
    check_books(sender.stats)


@pytest.mark.anyio
async def test_in_an_outage_what_waits_is_left_to_the_next_direct_request() -> None:
    clock = FakeClock()
    down = True

    def answer(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(503) if down else success(body)

    matomo = Matomo(answer)
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, max_concurrent_batches=1, clock=clock, sleep=clock.sleep)
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 3)
            await matomo.wait_for(1)
            await until(lambda: sender.stats.queued == 2)
            matomo.gate.set()
        # The request sending gave up on its own hit and did not take the others:
        # a request's task does not retry batch after batch through an outage.
        assert (sender.stats.dropped, sender.stats.queued) == (1, 2)
        assert len(matomo.bodies) == _retry.DIRECT_ATTEMPTS
        down = False
        # A request within the backoff that follows leaves its hit too.
        await sender.send_now([hit(3)])
        assert sender.stats.queued == 3
        assert len(matomo.bodies) == _retry.DIRECT_ATTEMPTS
        clock.now += _retry.RETRY_CAP
        await sender.send_now([hit(4)])
    assert sender.stats.sent == 4
    assert sorted(matomo.hits[_retry.DIRECT_ATTEMPTS :]) == sorted(
        set(range(5)) - set(matomo.hits[: _retry.DIRECT_ATTEMPTS])
    )
    check_books(sender.stats)


@pytest.mark.anyio
async def test_in_an_outage_what_waits_is_spooled_by_the_request_that_gave_up() -> None:
    clock = FakeClock()
    spool = FakeSpool()
    matomo = Matomo(lambda body: httpx.Response(503))
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(
            client, max_concurrent_batches=1, clock=clock, sleep=clock.sleep, spool=spool
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 3)
            await matomo.wait_for(1)
            await until(lambda: sender.stats.queued == 2)
            matomo.gate.set()
    # No request may come before the process ends: what waited is on disk.
    assert (sender.stats.spooled, sender.stats.queued, sender.stats.dropped) == (3, 0, 0)
    assert sorted(numbers([h.encode(authenticated=False) for h in spool.rows.values()])) == [
        0,
        1,
        2,
    ]
    check_books(sender.stats)


@pytest.mark.anyio
async def test_a_cancelled_direct_request_counts_its_hits_as_dropped() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, max_concurrent_batches=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, sender, 0, 3)
            await matomo.wait_for(1)
            await until(lambda: sender.stats.queued == 2)
            tg.cancel_scope.cancel()  # the server cancels the request sending
        stats = sender.stats
        assert (stats.dropped, stats.queued, stats.in_flight) == (1, 2, 0)
        # The next request sends its own hit and takes the ones that waited.
        matomo.gate.set()
        await sender.send_now([hit(3)])
    assert sender.stats.sent == 3
    # The cancelled request's hit had reached Matomo, which never answered it.
    assert sorted(matomo.hits) == [0, 1, 2, 3]
    check_books(sender.stats)


@pytest.mark.anyio
@pytest.mark.parametrize("answered", [True, False])
async def test_a_direct_request_sending_while_the_sender_closes_keeps_its_hits(
    answered: bool,
) -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.send_now, [hit(0)])
            await matomo.wait_for(1)
            await sender.aclose()
            # Closing leaves the request's batch to the request: not spooled, not dropped.
            assert (sender.stats.in_flight, sender.stats.dropped) == (1, 0)
            if answered:
                matomo.gate.set()
            else:
                tg.cancel_scope.cancel()  # the server cancels the request sending
        await sender.send_now([hit(1)])  # closed: dropped
    stats = sender.stats
    assert (stats.in_flight, stats.sent, stats.dropped) == (0, int(answered), 2 - answered)
    check_books(stats)


@pytest.mark.anyio
async def test_a_fork_child_does_not_inherit_the_direct_pause() -> None:
    clock = FakeClock()
    down = True

    def answer(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(503) if down else success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, clock=clock, sleep=clock.sleep)
        await sender.send_now([hit(0)])
        down = False
        await sender.send_now([hit(1)])  # within the pause after the failure: it waits
        assert (sender.stats.dropped, sender.stats.queued) == (1, 1)
        sent_before = len(matomo.bodies)
        # What os.register_at_fork runs in a child process:
        sender._after_fork_in_child()
        await sender.send_now([hit(2)])
    assert len(matomo.bodies) == sent_before + 1
    assert matomo.hits[-1] == 2
    assert sender.stats == Stats(submitted=1, sent=1, batches=1, concurrency=4, batch_size=100)


@pytest.mark.anyio
async def test_send_now_survives_a_broken_hit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Hit, *, authenticated: bool) -> str:
        raise RuntimeError("bug")

    # On the class: the queue keeps a hit's fields and makes the Hit again.
    monkeypatch.setattr(Hit, "encode", broken)
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client)
        with caplog.at_level(logging.ERROR, "asgi_matomo"):
            await sender.send_now([Hit("q", NOW)])
            async with sender.running_in_background():
                sender.submit(Hit("q", NOW))
    assert sender.stats.dropped == 2
    assert len(caplog.records) == 2


# -- lifecycle -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_before_start_and_after_close_is_dropped() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client)
        sender.submit(hit(0))
        async with sender.running_in_background():
            sender.submit(hit(1))
        sender.submit(hit(2))
    assert matomo.hits == [1]
    assert (sender.stats.submitted, sender.stats.sent, sender.stats.dropped) == (3, 1, 2)


@pytest.mark.anyio
async def test_aclose_is_idempotent_and_logs_one_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client)
        with caplog.at_level(logging.INFO, "asgi_matomo"):
            async with sender.running_in_background(), anyio.create_task_group() as tg:
                sender.submit(hit(0))
                tg.start_soon(sender.aclose)
                tg.start_soon(sender.aclose)
                await matomo.wait_for(1)
                assert not sender.running
                matomo.gate.set()
            await sender.aclose()
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert summaries == [
        "asgi_matomo: sender closed: submitted=1 sent=1 invalid=0 rejected=0 dropped=0 "
        "spooled=0 replayed=0 retried=0 batches=1 token_rejected=False"
    ]
    with pytest.raises(RuntimeError, match="closed; a sender runs once"):
        async with sender.running_in_background():
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_aclose_without_start_closes_the_spool() -> None:
    spool = FakeSpool()
    sender = BatchSender(endpoint=ENDPOINT, spool=spool)
    await sender.aclose()
    assert spool.closed
    assert spool.calls == ["close"]


@pytest.mark.anyio
@pytest.mark.parametrize("with_spool", [True, False])
async def test_shutdown_timeout_spools_or_drops_what_is_left(with_spool: bool) -> None:
    spool = FakeSpool() if with_spool else None
    matomo = Matomo()
    matomo.gate = anyio.Event()  # never set: Matomo hangs
    async with matomo.client() as client:
        sender = sender_for(
            client, batch_size=2, max_concurrent_batches=1, shutdown_timeout=0.05, spool=spool
        )
        async with sender.running_in_background():
            for n in range(5):
                sender.submit(hit(n))
            await matomo.wait_for(1)
    stats = sender.stats
    assert (stats.queued, stats.in_flight, stats.sent) == (0, 0, 0)
    if spool is not None:
        assert stats.spooled == 5
        assert sorted(h.timestamp for h in spool.rows.values()) == [
            hit(n).timestamp for n in range(5)
        ]
    else:
        assert stats.dropped == 5
    check_books(stats)


@pytest.mark.anyio
async def test_shutdown_flushes_the_queue() -> None:
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, batch_size=2)
        async with sender.running_in_background():
            for n in range(5):
                sender.submit(hit(n))
    assert matomo.hits == list(range(5))


@pytest.mark.anyio
async def test_retries_stop_at_the_shutdown_deadline() -> None:
    clock = FakeClock()
    spool = FakeSpool()
    matomo = Matomo(lambda body: httpx.Response(503, headers={"Retry-After": "100"}))
    async with matomo.client() as client:
        sender = sender_for(
            client,
            clock=clock,
            sleep=clock.sleep,
            spool=spool,
            retry_deadline=1e9,
            shutdown_timeout=3600,  # not what ends it: the retrying batch gives up at once
        )
        with anyio.fail_after(DEADLINE):
            async with sender.running_in_background():
                sender.submit(hit(0))
                sender.force_flush()
                await matomo.wait_for(2)
    # Retried while running, gave up as soon as shutdown began.
    assert sender.stats.spooled == 1
    assert list(spool.rows.values()) == [hit(0)]


@pytest.mark.anyio
@pytest.mark.parametrize("with_spool", [True, False])
async def test_shutdown_during_a_backoff_delivers_once_matomo_is_back(with_spool: bool) -> None:
    # Matomo was down and is back; the batches that failed are sleeping their
    # backoff, the others wait for a free slot. aclose() must not wait the
    # backoff out (nor drop or spool what Matomo would take now).
    sleep = EndlessSleep()
    spool = FakeSpool() if with_spool else None
    down = httpx.Response(500, json={"status": "error"}, headers={"Retry-After": "30"})
    matomo = Matomo(failing(down, down))
    async with matomo.client() as client:
        sender = sender_for(
            client,
            batch_size=2,
            max_concurrent_batches=2,
            clock=FakeClock(),
            sleep=sleep,
            spool=spool,
            shutdown_timeout=DEADLINE,
        )
        async with sender.running_in_background():
            for n in range(8):
                sender.submit(hit(n))
            sender.force_flush()
            await until(lambda: len(sleep.sleeps) == 2)
            assert (len(matomo.bodies), sender.stats.in_flight, sender.stats.queued) == (2, 4, 4)
    assert all(30.0 <= s <= 30.0 * (1 + RETRY_AFTER_JITTER) for s in sleep.sleeps)
    assert len(sleep.sleeps) == 2
    assert sorted(matomo.hits) == sorted([0, 1, 2, 3, *range(8)])
    stats = sender.stats
    assert (stats.sent, stats.dropped, stats.spooled, stats.retried) == (8, 0, 0, 2)
    check_books(stats)


@pytest.mark.anyio
async def test_shutdown_during_a_backoff_spools_what_still_fails() -> None:
    sleep = EndlessSleep()
    spool = FakeSpool()
    matomo = Matomo(lambda body: httpx.Response(503, headers={"Retry-After": "7200"}))
    async with matomo.client() as client:
        sender = sender_for(
            client,
            batch_size=2,
            max_concurrent_batches=2,
            clock=FakeClock(),
            sleep=sleep,
            spool=spool,
            retry_deadline=1e9,
            # A retry in 7200 s (waited RETRY_AFTER_CAP at most) does not fit: no waiting.
            shutdown_timeout=RETRY_AFTER_CAP / 2,
        )
        with anyio.fail_after(DEADLINE):
            async with sender.running_in_background():
                for n in range(8):
                    sender.submit(hit(n))
                sender.force_flush()
                await until(lambda: len(sleep.sleeps) == 2)
    # One last attempt for the sleeping batches, one for the queued ones; then the spool.
    assert sorted(matomo.hits) == sorted([0, 1, 2, 3, *range(8)])
    assert len(sleep.sleeps) == 2
    stats = sender.stats
    assert (stats.sent, stats.dropped, stats.spooled) == (0, 0, 8)
    assert sorted(spool.rows.values(), key=lambda h: h.timestamp) == [hit(n) for n in range(8)]
    check_books(stats)


@pytest.mark.anyio
async def test_cancelled_body_still_closes_cleanly() -> None:
    matomo = Matomo()
    matomo.gate = anyio.Event()
    spool = FakeSpool()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, batch_size=1)
        with anyio.CancelScope() as scope:
            async with sender.running_in_background():
                sender.submit(hit(0))
                await matomo.wait_for(1)
                scope.cancel()
                await anyio.sleep_forever()
    assert sender.stats.spooled == 1
    assert spool.closed


@pytest.mark.anyio
async def test_fork_child_starts_afresh(owned_clients: list[httpx.AsyncClient]) -> None:
    sender = BatchSender(endpoint=ENDPOINT, access_token=TOKEN)
    sender._tokens.state = _token.TokenState.REJECTED
    with anyio.CancelScope() as scope:  # a real child has no worker task to stop
        async with sender.running_in_background():
            sender.submit(hit(0))
            await sender.send_now([hit(1)])
            sender.submit(hit(2))
            assert sender.stats.queued == 2
            # What os.register_at_fork runs in a child process:
            sender._after_fork_in_child()
            assert not sender.running
            assert sender.stats == Stats(token_rejected=True, concurrency=4, batch_size=100)
            assert sender._transport.owned is None
            sender.submit(hit(3))  # the child has not started its own worker yet
            assert sender.stats.dropped == 1
            scope.cancel()
    # The child left the parent's connections alone.
    assert not owned_clients[0].is_closed
    await owned_clients[0].aclose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_register_at_fork_resets_the_child() -> None:
    sender = BatchSender(endpoint=ENDPOINT)
    sender._reporter.counters.sent = 5
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process that has threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os._exit(0 if sender.stats.sent == 0 and sender._pid == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sender.stats.sent == 5


def test_fork_hook_does_not_keep_the_sender_alive() -> None:
    sender = BatchSender(endpoint=ENDPOINT)
    hook = weakref.WeakMethod(sender._after_fork_in_child)
    del sender
    gc.collect()
    assert hook() is None
    _sender._call(hook)  # a dead sender's hook does nothing


# -- spool ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_spool_left_by_a_previous_process_is_replayed_at_start() -> None:
    spool = FakeSpool([hit(n) for n in range(5)])
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, batch_size=2)
        async with sender.running_in_background():
            await matomo.wait_for(3)
    assert matomo.hits == list(range(5))
    assert spool.rows == {}
    assert (sender.stats.replayed, sender.stats.sent) == (5, 5)


@pytest.mark.anyio
async def test_spooled_hits_come_back_when_matomo_recovers() -> None:
    clock = FakeClock()
    spool = FakeSpool()
    down = True

    def answer(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(503) if down else success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, clock=clock, sleep=clock.sleep, retry_deadline=5)
        async with sender.running_in_background():
            sender.submit(hit(0))
            sender.submit(hit(1))
            assert await sender.aflush(DEADLINE)
            assert sender.stats.spooled == 2
            down = False
            sender.submit(hit(2))
            assert await sender.aflush(DEADLINE)
            await until(lambda: not spool.rows)
    # The spooled two may come back before or after hit 2 (the start-up replay
    # may catch them just as Matomo recovers).
    assert sorted(matomo.hits[-3:]) == [0, 1, 2]
    assert (sender.stats.sent, sender.stats.replayed) == (3, 2)


@pytest.mark.anyio
async def test_sqlite_spool_carries_hits_to_the_next_process(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "spool.sqlite3"
    down = Matomo(lambda body: httpx.Response(503))
    async with down.client() as client:
        sender = sender_for(
            client, spool=SqliteSpool(path), clock=clock, sleep=clock.sleep, retry_deadline=1
        )
        async with sender.running_in_background():
            sender.submit(hit(0, cip="203.0.113.7"))
            sender.submit(hit(1))
    assert sender.stats.spooled == 2

    up = Matomo()
    spool = SqliteSpool(path)
    async with up.client() as client:
        sender = sender_for(client, spool=spool)
        async with sender.running_in_background():
            await up.wait_for(1)
    assert up.hits == [0, 1]
    assert sender.stats.replayed == 2
    reopened = SqliteSpool(path)
    assert reopened.count() == 0
    reopened.close()


@pytest.mark.anyio
async def test_a_retry_after_to_a_replay_holds_the_spool_back_that_long() -> None:
    clock = FakeClock()
    spool = FakeSpool([hit(0)])
    replay_answers = [httpx.Response(503, headers={"Retry-After": "40"})]

    def answer(body: dict[str, Any]) -> httpx.Response:
        if numbers(body["requests"]) == [0] and replay_answers:
            return replay_answers.pop(0)
        return success(body)

    matomo = Matomo(answer)
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, clock=clock, sleep=clock.sleep)
        await sender.send_now([hit(5)])  # Matomo answers: replay, 503 Retry-After: 40
        assert spool.calls == ["count", "claim", "release"]
        # Later requests are sent, but the spool is not, before 40 s (and their jitter).
        clock.now += 39.9
        await sender.send_now([hit(6)])
        assert spool.calls == ["count", "claim", "release"]
        clock.now += 40 * RETRY_AFTER_JITTER + 0.1
        await sender.send_now([hit(7)])
    assert matomo.hits == [5, 0, 6, 7, 0]
    assert spool.rows == {}
    assert (sender.stats.replayed, sender.stats.sent) == (1, 4)


@pytest.mark.anyio
async def test_replay_releases_on_failure_and_acks_refusals() -> None:
    spool = FakeSpool([hit(0), hit(1)])
    spool_answers = [503, 400]

    def answer(body: dict[str, Any]) -> httpx.Response:
        if numbers(body["requests"])[0] < 5 and spool_answers:
            return httpx.Response(spool_answers.pop(0), text="bad")
        return success(body)

    matomo = Matomo(answer)
    clock = FakeClock()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, batch_size=1, clock=clock)
        await sender.send_now([hit(5)])  # Matomo answers: replay one batch, it fails
        assert spool.calls == ["count", "claim", "release"]
        assert len(spool.rows) == 2
        assert not spool.leased
        clock.now += _retry.RETRY_CAP  # its backoff has passed
        await sender.send_now([hit(6)])  # replay: refused with 400, not kept
        assert len(spool.rows) == 1
        await sender.send_now([hit(7)])
    assert spool.rows == {}
    assert matomo.hits == [5, 0, 6, 0, 7, 1]
    stats = sender.stats
    assert (stats.sent, stats.rejected, stats.replayed) == (4, 1, 1)


@pytest.mark.anyio
async def test_queue_overflow_goes_to_the_spool() -> None:
    spool = FakeSpool(evict=1)
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, max_queue_size=2, batch_size=2)
        async with sender.running_in_background():
            for n in range(2):
                sender.submit(hit(n))
            await matomo.wait_for(1)
            for n in range(2, 8):
                sender.submit(hit(n))
            # 2 wait in the queue, 2 overflow to the spool, then the overflow is full.
            await until(lambda: "put" in spool.calls)
            matomo.gate.set()
    stats = sender.stats
    assert stats.spooled == 2
    assert stats.dropped == 2 + 1  # overflow full, and the spool evicted one
    assert sorted(numbers([h.encode(authenticated=False) for h in spool.rows.values()])) == [4, 5]


@pytest.mark.anyio
async def test_spool_failures_are_survived(caplog: pytest.LogCaptureFixture) -> None:
    spool = FakeSpool([hit(0)])
    spool.fail = {"count", "put", "close"}
    matomo = Matomo(lambda body: httpx.Response(400))
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, retry_deadline=0)
        with caplog.at_level(logging.WARNING, "asgi_matomo"):
            async with sender.running_in_background():
                sender.submit(hit(1))
                await until(lambda: any("reading the spool" in r.msg for r in caplog.records))
    assert sender.stats.rejected == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "reading the spool failed" in messages
    assert "closing the spool failed" in messages


@pytest.mark.anyio
async def test_a_spool_that_cannot_be_read_is_tried_again_after_a_backoff() -> None:
    spool = FakeSpool([hit(0)])
    spool.fail = {"claim"}
    matomo = Matomo()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool)
        async with sender.running_in_background():
            await until(lambda: "claim" in spool.calls)
            # The shortest backoff is half a second: the window is what is measured.
            await anyio.sleep(0.3)
            assert spool.calls.count("claim") == 1
            spool.fail = set()
            with anyio.fail_after(DEADLINE):
                while sender.stats.replayed < 1:
                    await anyio.sleep(0.01)
    assert matomo.hits == [0]


@pytest.mark.anyio
async def test_failed_spool_write_drops() -> None:
    clock = FakeClock()
    spool = FakeSpool()
    spool.fail = {"put"}
    matomo = Matomo(lambda body: httpx.Response(503))
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, clock=clock, sleep=clock.sleep, retry_deadline=1)
        async with sender.running_in_background():
            sender.submit(hit(0))
    assert (sender.stats.spooled, sender.stats.dropped) == (0, 1)


@pytest.mark.anyio
async def test_replay_stops_at_shutdown() -> None:
    spool = FakeSpool([hit(0), hit(1)])
    matomo = Matomo()
    matomo.gate = anyio.Event()
    async with matomo.client() as client:
        sender = sender_for(client, spool=spool, batch_size=1, shutdown_timeout=0.05)
        async with sender.running_in_background():
            await matomo.wait_for(1)
    # The claimed batch was given back, the other never claimed.
    assert len(spool.rows) == 2
    assert not spool.leased
    assert sender.stats.replayed == 0


# -- a real HTTP server, two real event loops --------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: connections outlive a request
    bodies: list[dict[str, Any]] = []  # noqa: RUF012 (replaced per server below)
    peers: list[tuple[str, int]] = []  # noqa: RUF012
    endpoint = ""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(json.loads(self.rfile.read(length)))
        self.peers.append(self.client_address)
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[type[_Handler]]:
    class Handler(_Handler):
        pass

    handler = Handler
    handler.bodies, handler.peers = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}/matomo.php"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_real_connections_across_event_loops(http_server: type[_Handler]) -> None:
    sender = BatchSender(endpoint=http_server.endpoint)

    async def twice() -> None:
        await sender.send_now([hit(2)])
        await sender.send_now([hit(3)])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(sender.send_now([hit(0)]))
        anyio.run(sender.send_now, [hit(1)], backend="trio")
        asyncio.run(twice())
        asyncio.run(sender.aclose())
        gc.collect()
    # A keep-alive socket left open by a finished loop would warn when collected.
    assert [w.message for w in caught] == []
    assert [numbers(b["requests"]) for b in http_server.bodies] == [[0], [1], [2], [3]]
    peers = http_server.peers
    assert peers[2] == peers[3]  # same loop: the connection is reused
    assert len(set(peers)) == 3
    assert sender.stats.sent == 4
