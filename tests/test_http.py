"""The lean HTTP/1.1 client: real sockets on loopback, and its parser fed byte by byte."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import trustme

from asgi_matomo import _http, _http_wire, _transport
from asgi_matomo._collector import Collector
from asgi_matomo._hit import Hit
from asgi_matomo._http import (
    MAX_BODY,
    LeanClient,
    LeanConnectionError,
    LeanHeaders,
    LeanHTTPError,
    LeanProtocolError,
    LeanResponse,
    supports,
)
from asgi_matomo._sender import BatchSender

pytestmark = pytest.mark.anyio

DEADLINE = 10.0  # seconds a test may wait for a condition before it fails
JSON = {"Content-Type": "application/json"}
OK_BODY = b'{"status":"success","tracked":1,"invalid":0}'


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        # What `uvicorn[standard]` runs: the client only uses asyncio's public API.
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)  # polling a condition with a deadline
    assert condition(), what


# -- a tiny server --------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # the number of the connection it came on, from 1


async def read_request(reader: asyncio.StreamReader, connection: int) -> Request | None:
    """The next request on a connection, or None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} sent twice"
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body, connection)


Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def answer(status: int = 200, body: bytes = OK_BODY, *extra: str) -> bytes:
    fields = [f"Content-Length: {len(body)}", "Content-Type: application/json", *extra]
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n"
    return head.encode() + body


async def keep_alive(
    server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    """Answers every request on the connection with Content-Length."""
    while (request := await server.next_request(reader, n)) is not None:
        writer.write(answer(body=server.body or OK_BODY))
        await writer.drain()
        del request


async def first_connection_answered_once(
    server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> bool:
    """True on the first connection, after answering one request; later ones kept alive."""
    if n > 1:
        await keep_alive(server, reader, writer, n)
        return False
    await server.next_request(reader, n)
    writer.write(answer())
    await writer.drain()
    return True


@dataclass
class Server:
    handler: Handler = keep_alive
    ssl: ssl.SSLContext | None = None
    body: bytes = b""
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    port: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://127.0.0.1:{self.port}/matomo.php"

    async def next_request(self, reader: asyncio.StreamReader, n: int) -> Request | None:
        request = await read_request(reader, n)
        if request is not None:
            self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.connections += 1
        self.open_connections += 1
        try:
            await self.handler(self, reader, writer, self.connections)
        except ConnectionError:
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            # Every handler ends when its client closes the connection.
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=DEADLINE)
            assert not self.tasks, "a server connection is still open"
            await server.wait_closed()


@asynccontextmanager
async def serving(handler: Handler = keep_alive, **options: Any) -> AsyncIterator[Server]:
    async with Server(handler, **options).running() as server:
        yield server


def loop_parser() -> str:
    """h11 on asyncio's loop, httptools on uvloop: both parsers see every socket test."""
    return "h11" if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop) else "httptools"


@asynccontextmanager
async def lean(url: str, **options: Any) -> AsyncIterator[LeanClient]:
    options.setdefault("parser", loop_parser())
    client = LeanClient(url, headers={"User-Agent": "asgi-matomo/test"}, **options)
    try:
        yield client
    finally:
        await client.aclose()
    assert not client._connections


async def post(client: LeanClient, url: str, content: bytes = b"{}") -> LeanResponse:
    return await client.post(url, content=content, headers=JSON)


def one_answer(raw: bytes, *, then_close: bool = True) -> Handler:
    """A server that answers the first request with `raw` bytes as they are."""

    async def handler(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if await server.next_request(reader, n) is None:
            return
        writer.write(raw)
        await writer.drain()
        if not then_close:
            await keep_alive(server, reader, writer, n)

    return handler


# -- answers over real sockets --------------------------------------------------------


async def test_collector_answers_and_connections_are_reused() -> None:
    with Collector(sites=[1]) as collector:
        url = collector.tracking_url
        async with lean(url) as client:
            for n in range(3):
                body = {"requests": [f"?idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{n}"]}
                response = await post(client, url, json.dumps(body).encode())
                assert response.status_code == 200
                assert response.headers.get("content-type") == "application/json"
                assert json.loads(response.text)["tracked"] == 1
                assert len(client._connections) == 1
        hits = collector.wait_for_hits(3)
    assert sorted(hit.url or "" for hit in hits) == [f"https://example.com/{n}" for n in range(3)]


async def test_request_headers_and_target() -> None:
    async with serving() as server, lean(server.url) as client:
        url = server.url + "?a=1&b=%2F&c"
        await client.post(url, content=b"[1]", headers={"Content-Type": "application/json"})
    (request,) = server.requests
    assert (request.method, request.target) == ("POST", "/matomo.php?a=1&b=%2F&c")
    assert request.headers == {
        "host": f"127.0.0.1:{server.port}",
        "user-agent": "asgi-matomo/test",
        "accept": "*/*",
        "accept-encoding": "identity",
        "content-type": "application/json",
        "connection": "keep-alive",
        "content-length": "3",
    }
    assert request.body == b"[1]"


async def test_a_large_request_body_arrives_intact() -> None:
    content = bytes(range(256)) * 4096  # 1 MiB
    async with serving() as server, lean(server.url) as client:
        for _ in range(2):
            assert (await post(client, server.url, content)).status_code == 200
    assert [r.body == content for r in server.requests] == [True, True]
    assert server.connections == 1


async def test_chunked_answer() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    async with serving(one_answer(raw, then_close=False)) as server, lean(server.url) as client:
        assert (await post(client, server.url)).text == "hello, world"
        assert (await post(client, server.url)).text == OK_BODY.decode()
    assert server.connections == 1


async def test_answer_fields_any_case_repeated_ones_joined() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nX-Seen: a\r\nContent-Length: 2\r\nx-seen: b\r\n"
        b"Retry-After: 7\r\nX-When: \xe9t\xe9\r\n\r\nok"
    )
    async with serving(one_answer(raw)) as server, lean(server.url) as client:
        headers = (await post(client, server.url)).headers
    assert headers["x-seen"] == headers.get("X-SEEN") == "a, b"
    assert headers.get("retry-after") == headers["Retry-After"] == "7"
    assert headers.get("x-when") == "été"  # Latin-1, as httpx reads them
    assert headers.get("missing") is None
    assert headers.get("missing", "default") == "default"
    assert sorted(headers) == ["content-length", "retry-after", "x-seen", "x-when"]


async def test_close_delimited_answer_is_not_reused() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with serving(one_answer(raw)) as server, lean(server.url) as client:
        assert (await post(client, server.url)).text == "until the end"
        assert (await post(client, server.url)).status_code == 200
    assert server.connections == 2
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "raw",
    [
        answer(200, OK_BODY, "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_connection_close_or_http10_is_not_reused(raw: bytes) -> None:
    async with serving(one_answer(raw, then_close=False)) as server, lean(server.url) as client:
        assert (await post(client, server.url)).status_code == 200
        assert (await post(client, server.url)).status_code == 200
    assert server.connections == 2


async def test_100_continue_before_the_answer() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer(
        204, b""
    )
    async with serving(one_answer(raw, then_close=False)) as server, lean(server.url) as client:
        response = await post(client, server.url)
        assert (response.status_code, response.text) == (204, "")
        assert "link" not in response.headers
        assert (await post(client, server.url)).status_code == 200
    assert server.connections == 1


async def test_an_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async def close_when_idle(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if await server.next_request(reader, n) is not None:
            writer.write(answer())
            await writer.drain()
            # Keep-alive timeout: the server closes the idle connection.

    async with serving(close_when_idle) as server, lean(server.url) as client:
        await post(client, server.url)
        (conn,) = client._idle
        await wait_until(lambda: conn.eof, "the client sees the server's close")
        assert (await post(client, server.url)).status_code == 200
    assert [r.connection for r in server.requests] == [1, 2]


async def test_a_reused_connection_that_fails_before_answering_is_retried_once() -> None:
    async def reset_second_request(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if not await first_connection_answered_once(server, reader, writer, n):
            return
        # The server drops the connection as the next request arrives, unread
        # (unread bytes make the kernel answer with a reset).
        await reader.readexactly(1)

    async with serving(reset_second_request) as server, lean(server.url) as client:
        await post(client, server.url)
        assert (await post(client, server.url, b"[2]")).status_code == 200
    assert [(r.connection, r.body) for r in server.requests] == [(1, b"{}"), (2, b"[2]")]


async def test_a_fresh_connection_that_fails_is_an_error() -> None:
    async def hang_up(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader, n)

    async with serving(hang_up) as server, lean(server.url) as client:
        with pytest.raises(LeanConnectionError, match="before its answer"):
            await post(client, server.url)
    assert server.connections == 1


async def test_a_retry_that_fails_too_is_an_error() -> None:
    async def answer_once(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if await server.next_request(reader, n) is not None and n == 1:
            writer.write(answer())
            await writer.drain()
            await server.next_request(reader, n)  # then hang up without answering

    async with serving(answer_once) as server, lean(server.url) as client:
        await post(client, server.url)
        with pytest.raises(LeanConnectionError):
            await post(client, server.url)
    assert [r.connection for r in server.requests] == [1, 1, 2]


async def test_the_server_closing_mid_answer_is_an_error() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it"
    async with serving(one_answer(raw)) as server, lean(server.url) as client:
        with pytest.raises(LeanConnectionError, match="in the middle of its answer"):
            await post(client, server.url)


async def test_garbage_status_line_is_an_error() -> None:
    garbage = one_answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    async with serving(garbage) as server, lean(server.url) as client:
        with pytest.raises(LeanProtocolError, match=r"not a well-formed HTTP/1\.1 answer"):
            await post(client, server.url)
        assert isinstance(LeanProtocolError("x"), LeanHTTPError)


async def test_a_timeout_closes_the_connection_and_leaves_nothing_running() -> None:
    async def never_answer(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader, n)
        await reader.read()  # until the client closes

    tasks = asyncio.all_tasks()
    async with serving(never_answer) as server, lean(server.url) as client:
        with pytest.raises(TimeoutError), anyio.fail_after(0.2):
            await post(client, server.url)
        await wait_until(lambda: not client._connections, "the client's transport is gone")
        await wait_until(lambda: server.open_connections == 0, "the server sees the close")
        assert not client._idle
        assert asyncio.all_tasks() - tasks == set()
        # The client still works.
        server.handler = keep_alive
        assert (await post(client, server.url)).status_code == 200


@pytest.mark.parametrize("reused", [False, True])
async def test_the_timeout_argument_closes_the_connection_without_a_cancel_scope(
    reused: bool,
) -> None:
    async def answer_once_then_never(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if reused:
            assert await server.next_request(reader, n) is not None
            writer.write(answer())
            await writer.drain()
        await server.next_request(reader, n)
        await reader.read()  # until the client closes

    tasks = asyncio.all_tasks()
    async with serving(answer_once_then_never) as server, lean(server.url) as client:
        if reused:
            assert (await post(client, server.url)).status_code == 200
            assert client._idle
        with pytest.raises(TimeoutError, match="within the timeout"):
            await client.post(server.url, content=b"{}", headers=JSON, timeout=0.2)
        # One connection: a timed-out request is not sent again on a new one.
        assert server.connections == 1
        await wait_until(lambda: not client._connections, "the client's transport is gone")
        await wait_until(lambda: server.open_connections == 0, "the server sees the close")
        assert not client._idle
        assert asyncio.all_tasks() - tasks == set()
        # In time, the same argument changes nothing.
        server.handler = keep_alive
        response = await client.post(server.url, content=b"{}", headers=JSON, timeout=DEADLINE)
        assert response.status_code == 200


async def test_one_timer_per_connection_enforces_the_deadline_of_each_exchange() -> None:
    loop = asyncio.get_running_loop()
    first_deadline = 0.0

    async def answer_late_then_never(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if n > 1:
            await keep_alive(server, reader, writer, n)
            return
        assert await server.next_request(reader, n) is not None
        writer.write(answer())  # the first at once
        await writer.drain()
        assert await server.next_request(reader, n) is not None
        # The second once the first one's deadline has passed: its timer comes due.
        while loop.time() < first_deadline + 0.1:
            await asyncio.sleep(0.01)
        writer.write(answer())
        await writer.drain()
        await server.next_request(reader, n)
        await reader.read()  # the third is never answered: until the client closes

    async with serving(answer_late_then_never) as server, lean(server.url) as client:
        first_deadline = loop.time() + 0.2
        assert (await client.post(server.url, content=b"{}", timeout=0.2)).status_code == 200
        # A longer deadline outlives the timer set for the first one.
        response = await client.post(server.url, content=b"{}", timeout=DEADLINE)
        assert response.status_code == 200
        (conn,) = client._idle  # not timed out: kept for the next request
        # A shorter deadline after a longer one is kept all the same.
        with (
            pytest.raises(TimeoutError, match="within the timeout"),
            anyio.fail_after(DEADLINE / 2),
        ):
            await client.post(server.url, content=b"{}", timeout=0.2)
        assert conn.timed_out
        assert server.connections == 1
        await wait_until(lambda: not client._connections, "the client's transport is gone")
        # A connection's timer goes with it.
        assert (await client.post(server.url, content=b"{}", timeout=DEADLINE)).status_code == 200
        (conn,) = client._idle
        timer = conn._timer
        assert timer is not None
        assert not timer.cancelled()
        await client.aclose()
        await wait_until(lambda: not client._connections, "the client's transport is gone")
        assert timer.cancelled()


async def test_a_timer_due_on_an_idle_connection_leaves_it_usable() -> None:
    async with serving() as server, lean(server.url) as client:
        assert (await client.post(server.url, content=b"{}", timeout=0.05)).status_code == 200
        (conn,) = client._idle
        await wait_until(lambda: conn._timer is None, "the timer comes due")
        assert not conn.timed_out
        assert client._idle == [conn]
        assert (await client.post(server.url, content=b"{}", timeout=DEADLINE)).status_code == 200
    assert server.connections == 1


async def test_a_connection_that_cannot_be_made_in_time_is_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving() as server, lean(server.url) as client:
        never = asyncio.get_running_loop().create_future()

        async def connect_forever(*args: Any, **kwargs: Any) -> Any:
            return await never

        monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", connect_forever)
        with pytest.raises(TimeoutError, match="no connection within the timeout"):
            await client.post(server.url, content=b"{}", headers=JSON, timeout=0.05)


async def test_an_oversized_answer_is_cut_and_its_connection_closed() -> None:
    big = b"x" * 5000
    async with serving() as server, lean(server.url, max_body=1000) as client:
        server.body = big
        response = await post(client, server.url)
        assert response.content == big[:1000]
        assert not client._idle
        assert (await post(client, server.url)).content == big[:1000]
    assert server.connections == 2


async def test_the_default_cap_is_one_mebibyte() -> None:
    async with serving() as server, lean(server.url) as client:
        server.body = b"y" * (MAX_BODY + 10)
        assert len((await post(client, server.url)).content) == MAX_BODY


@pytest.mark.parametrize("later", [False, True])
async def test_bytes_after_the_answer_make_a_connection_unusable(later: bool) -> None:
    idle = asyncio.Event()
    timeout = b"HTTP/1.1 408 Request Timeout\r\n\r\n"

    async def chatty(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader, n)
        writer.write(answer() + (b"" if later else timeout))
        if later:
            await idle.wait()
            writer.write(timeout)
        await keep_alive(server, reader, writer, n)

    async with serving(chatty) as server, lean(server.url) as client:
        await post(client, server.url)
        if later:
            (conn,) = client._idle
            idle.set()
            await wait_until(lambda: conn not in client._connections, "the client hangs up")
        else:
            assert not client._idle
        assert (await post(client, server.url)).status_code == 200
    assert server.connections == 2


async def test_a_server_flooding_an_idle_connection_is_cut_off_with_bounded_memory() -> None:
    flood = bytes(64 * 1024)
    cap = 256 * 1024 * 1024  # what the server writes if the client never hangs up
    written = 0
    idle = asyncio.Event()

    async def flooding(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        nonlocal written
        if not await first_connection_answered_once(server, reader, writer, n):
            return
        await idle.wait()
        while written < cap:  # until the client resets the connection
            writer.write(flood)
            await writer.drain()
            written += len(flood)

    tracemalloc.start()
    try:
        async with serving(flooding) as server, lean(server.url) as client:
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            assert (await post(client, server.url)).status_code == 200
            assert len(client._idle) == 1  # back in the pool
            idle.set()
            await wait_until(lambda: not client._connections, "the client hangs up")
            await wait_until(lambda: server.open_connections == 0, "the flood ends")
            _, peak = tracemalloc.get_traced_memory()
            # Nothing of the flood is kept: the client closed the connection at its first byte.
            assert peak - start < 4 * 1024 * 1024
            assert written < cap
            assert not client._idle
            assert (await post(client, server.url)).status_code == 200
    finally:
        tracemalloc.stop()
    assert [r.connection for r in server.requests] == [1, 2]


async def test_idle_connections_expire_and_are_capped() -> None:
    async with serving() as server, lean(server.url, max_idle=1, keepalive_expiry=0) as client:
        await asyncio.gather(post(client, server.url), post(client, server.url))
        assert len(client._idle) == 1  # the other one was closed
        await post(client, server.url)  # the idle one has expired: a new connection
    assert server.connections == 3


async def test_aclose_fails_a_request_in_flight_and_the_client_stays_closed() -> None:
    async def slow(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader, n)
        await reader.read()

    async with serving(slow) as server:
        client = LeanClient(server.url)
        task = asyncio.ensure_future(post(client, server.url))
        await wait_until(lambda: bool(server.requests), "the request arrives")
        await client.aclose()
        with pytest.raises(LeanConnectionError):
            await task
        assert client.is_closed
        with pytest.raises(LeanHTTPError, match="closed"):
            await post(client, server.url)


async def test_aclose_while_connecting() -> None:
    async with serving() as server:
        client = LeanClient(server.url)
        task = asyncio.ensure_future(post(client, server.url))
        await asyncio.sleep(0)  # the task is in create_connection now
        await client.aclose()
        with pytest.raises(LeanHTTPError, match="closed"):
            await task
        await wait_until(lambda: not client._connections, "the connection is closed")


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def test_tls_with_an_unknown_ca_is_refused(
    server_tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with serving(ssl=server_tls) as server, lean(server.url) as client:
        with pytest.raises(LeanConnectionError, match="certificate verification failed") as info:
            await post(client, server.url)
    # The sender looks for it in the chain to say what to set.
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert server.requests == []


async def test_tls_trusts_ssl_cert_file(
    ca: trustme.CA, server_tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    async with serving(ssl=server_tls) as server, lean(server.url) as client:
        assert (await post(client, server.url)).status_code == 200
        assert (await post(client, server.url)).status_code == 200
        (conn,) = client._idle
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert server.connections == 1
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"


def test_trust_store_like_httpx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    context = _http._ssl_context()
    # A directory is read lazily: nothing loaded up front, certifi not used.
    assert context.cert_store_stats()["x509_ca"] == 0
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    monkeypatch.delenv("SSL_CERT_DIR")
    assert _http._ssl_context().cert_store_stats()["x509_ca"] > 0  # certifi's bundle


# -- the parsers, fed byte by byte --------------------------------------------------------

PARSERS = ["h11", "httptools"]


async def parse(
    raw: bytes,
    *,
    parser: str,
    byte_by_byte: bool = False,
    lost: Exception | None = None,
    limit: int = MAX_BODY,
) -> tuple[LeanResponse, bool]:
    """Parse `raw` as if it arrived on a connection that then ended (EOF or `lost`)."""
    loop = asyncio.get_running_loop()
    conn = _http._Connection(loop, lambda c: None, limit, parser)
    conn.send(_http_wire.RequestHead("/matomo.php", [(b"Host", b"matomo.example.com")]), b"{}")

    async def feed() -> None:
        pieces = [raw[i : i + 1] for i in range(len(raw))] if byte_by_byte else [raw]
        for piece in pieces:
            await asyncio.sleep(0)
            if piece:  # a transport never hands over empty data
                conn.data_received(piece)
        await asyncio.sleep(0)
        if lost is None:
            conn.eof_received()
        conn.connection_lost(lost)

    feeder = asyncio.ensure_future(feed())
    try:
        assert conn.answer is not None
        return await conn.answer
    finally:
        await feeder
        conn.abort()  # no transport: nothing to do


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize(
    ("raw", "status", "body", "keep_alive"),
    [
        (answer(201, b"abc"), 201, b"abc", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", 304, b"", True),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n", 200, b"", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}", False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 200, b"until the end", False),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            200,
            b"hello, world",
            True,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n",
            204,
            b"",
            True,
        ),
    ],
)
async def test_parser(
    raw: bytes, status: int, body: bytes, keep_alive: bool, byte_by_byte: bool, parser: str
) -> None:
    response, reusable = await parse(raw, parser=parser, byte_by_byte=byte_by_byte)
    assert (response.status_code, response.content, reusable) == (status, body, keep_alive)
    assert "link" not in response.headers  # an interim answer's headers are not kept


@pytest.mark.parametrize(
    ("raw", "h11_reads"),
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nab", b"ab"),  # bare LF line ends
        (b"HTTP/1.1 200\r\nContent-Length: 2, 2\r\n\r\nab", b"ab"),
        (b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nContent-Length: 0\r\n\r\n", b""),  # folded
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            b"abc",
        ),
    ],
)
async def test_forms_h11_tolerates_and_httptools_refuses(raw: bytes, h11_reads: bytes) -> None:
    response, _ = await parse(raw, parser="h11")
    assert response.content == h11_reads
    with pytest.raises(LeanProtocolError, match="not a well-formed"):
        await parse(raw, parser="httptools")


async def test_a_transfer_coding_other_than_chunked() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw"
    with pytest.raises(LeanProtocolError, match="not a well-formed"):
        await parse(raw, parser="h11")
    # httptools reads it to the end of the connection, as RFC 9112 6.3 says.
    response, reusable = await parse(raw, parser="httptools")
    assert (response.content, reusable) == (b"raw", False)


@pytest.mark.parametrize("parser", PARSERS)
async def test_repeated_headers(parser: str) -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: one\r\nx-a: three\r\nContent-Length: 0\r\n\r\n"
    response, _ = await parse(raw, parser=parser)
    headers = response.headers
    assert headers.get("X-A") == "one, three"
    assert headers.get("missing") is None
    assert (len(headers), sorted(headers)) == (2, ["content-length", "x-a"])
    assert "x-a" in repr(headers)
    assert repr(response) == "<LeanResponse [200]>"


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200OK\r\n\r\n", "not a well-formed"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", "not a well-formed"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "gzip"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * _http.MAX_HEAD, r"buffer too long|larger than"),
    ],
)
async def test_malformed_answers(raw: bytes, message: str, parser: str) -> None:
    with pytest.raises(LeanProtocolError, match=message):
        await parse(raw, parser=parser)


async def test_an_upgrade_is_refused() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    with pytest.raises(LeanProtocolError, match=r"switched protocols \(HTTP 101\)"):
        await parse(raw, parser="httptools")
    with pytest.raises(LeanProtocolError, match="not a well-formed"):
        await parse(raw, parser="h11")


@pytest.mark.parametrize("parser", PARSERS)
async def test_an_endless_head_is_refused_at_the_cap(parser: str) -> None:
    # Fed in pieces, a head that never ends is refused once it passes MAX_HEAD.
    raw = b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * (_http.MAX_HEAD // 6 + 100)
    loop = asyncio.get_running_loop()
    conn = _http._Connection(loop, lambda c: None, MAX_BODY, parser)
    conn.send(_http_wire.RequestHead("/", [(b"Host", b"x")]), b"")
    for start in range(0, len(raw), 1000):
        conn.data_received(raw[start : start + 1000])
        if conn.answer is not None and conn.answer.done():
            break
    assert conn.answer is not None
    with pytest.raises(LeanProtocolError):
        await conn.answer
    assert start < _http.MAX_HEAD + 1000


@pytest.mark.parametrize("parser", PARSERS)
async def test_endless_trailers_are_refused_at_a_cap(parser: str) -> None:
    # httptools gathered trailers in memory without a bound (hundreds of MB in
    # a few seconds from a hostile server, until http_timeout).
    body_cap = 1000
    start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    endless = b"X-Trailer: " + b"a" * 1000 + b"\r\n"
    loop = asyncio.get_running_loop()
    conn = _http._Connection(loop, lambda c: None, body_cap, parser)
    conn.send(_http_wire.RequestHead("/", [(b"Host", b"x")]), b"")
    conn.data_received(start)
    fed = 0
    while not (conn.answer is not None and conn.answer.done()):
        conn.data_received(endless)
        fed += len(endless)
        assert fed < 10 * (_http.MAX_HEAD + body_cap), "never refused"
    with pytest.raises(LeanProtocolError):
        await conn.answer
    assert fed <= _http.MAX_HEAD + body_cap + len(endless)


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "before its answer"),
        (b"HTTP/1.1 200 OK\r\n", "in the middle of its answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", "in the middle"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "in the middle"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab", "in the middle"),
    ],
)
async def test_cut_answers(raw: bytes, message: str, byte_by_byte: bool, parser: str) -> None:
    with pytest.raises(LeanConnectionError, match=message):
        await parse(raw, parser=parser, byte_by_byte=byte_by_byte)


@pytest.mark.parametrize("parser", PARSERS)
async def test_a_reset_during_a_close_delimited_body_is_an_error(parser: str) -> None:
    raw = b"HTTP/1.1 200 OK\r\n\r\npart"
    with pytest.raises(LeanConnectionError, match="ConnectionResetError"):
        await parse(raw, parser=parser, lost=ConnectionResetError())


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("byte_by_byte", [False, True])
async def test_oversized_bodies_are_cut(byte_by_byte: bool, parser: str) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n"
    )
    response, reusable = await parse(chunked, parser=parser, limit=6, byte_by_byte=byte_by_byte)
    assert (response.content, reusable) == (b"abcdef", False)
    to_close = b"HTTP/1.1 200 OK\r\n\r\nabcdefgh"
    response, reusable = await parse(to_close, parser=parser, limit=6, byte_by_byte=byte_by_byte)
    assert (response.content, reusable) == (b"abcdef", False)


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("coding", "compressed"),
    [
        ("gzip", gzip.compress(b"packed")),
        ("deflate", zlib.compress(b"packed")),
        ("br", b"packed"),  # kept as received
        ("identity", b"packed"),
    ],
)
async def test_content_encoding(coding: str, compressed: bytes, parser: str) -> None:
    raw = (
        f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n"
        f"Content-Length: {len(compressed)}\r\n\r\n"
    ).encode() + compressed
    response, _ = await parse(raw, parser=parser)
    assert response.content == b"packed"


@pytest.mark.parametrize(
    ("content_type", "text"),
    [
        ("text/plain; format=flowed; charset=latin-1", "caf\xc3\xa9"),
        ('text/plain; charset="utf-8"', "café"),
        ("text/plain; charset=no-such-charset", "café"),
        ("text/plain", "café"),
        (None, "café"),
    ],
)
def test_text_decoding(content_type: str | None, text: str) -> None:
    fields = [(b"Content-Type", content_type.encode())] if content_type else []
    assert LeanResponse(200, LeanHeaders(fields), "café".encode()).text == text
    assert LeanResponse(200, LeanHeaders([]), b"\xff").text == "\ufffd"


# -- URLs and request headers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://matomo.example.com/matomo.php", True),
        ("https://matomo.example.com:8443/m/matomo.php?x=1#frag", True),
        ("http://[::1]:8080/matomo.php", True),
        ("https://user:pass@matomo.example.com/matomo.php", False),
        ("ftp://matomo.example.com/matomo.php", False),
        ("http://bücher.example/matomo.php", False),
        ("http:///matomo.php", False),
        ("http://matomo.example.com/a b", False),
        ("http://matomo.example.com/é", False),
        ("http://matomo.example.com:99999/", False),
        ("http://matomo.example.com:0/", False),
    ],
)
def test_supported_urls(url: str, ok: bool) -> None:
    assert supports(url) is ok
    if not ok:
        with pytest.raises(ValueError, match=r"\w"):
            LeanClient(url)


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        ("http://Matomo.Example.com:80", "matomo.example.com", "/"),
        ("https://matomo.example.com:443?q", "matomo.example.com", "/?q"),
        ("https://[::1]:8443/m.php#x", "[::1]:8443", "/m.php"),
    ],
)
def test_host_and_target(url: str, host: str, target: str) -> None:
    client = LeanClient(url, headers={"User-Agent": "a", "Host": "ignored", "Accept": "b"})
    head = client._head(url, {"content-length": "9", "X-Extra": "1"}).frame(b"{}").decode()
    lines = head.split("\r\n")
    assert lines[0] == f"POST {target} HTTP/1.1"
    assert lines[1] == f"Host: {host}"
    assert "Accept: b" in lines
    assert "X-Extra: 1" in lines
    assert [line for line in lines if line.lower().startswith("content-length")] == [
        "Content-Length: 2"
    ]


def test_other_urls_of_the_same_origin_only() -> None:
    client = LeanClient("http://matomo.example.com/matomo.php")
    head = client._head("http://matomo.example.com/piwik.php?a", None).frame(b"")
    assert head.startswith(b"POST /piwik.php?a HTTP/1.1\r\n")
    with pytest.raises(ValueError, match="sends to"):
        client._head("http://other.example.com/matomo.php", None)


@pytest.mark.parametrize(("name", "value"), [("X-A", "1\r\nX-B: 2"), ("X A", "1"), ("", "1")])
def test_header_injection_is_refused(name: str, value: str) -> None:
    client = LeanClient("http://matomo.example.com/matomo.php")
    with pytest.raises(ValueError, match="invalid header"):
        client._head("http://matomo.example.com/matomo.php", {name: value})
    with pytest.raises(ValueError, match="invalid header"):
        LeanClient("http://matomo.example.com/matomo.php", headers={name: value})


# -- in the sender ----------------------------------------------------------------------


def hits(n: int) -> list[Hit]:
    now = time.time()
    return [Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now) for i in range(n)]


async def test_sender_uses_the_lean_client_on_asyncio() -> None:
    with Collector(sites=[1]) as collector:
        sender = BatchSender(endpoint=collector.tracking_url, batch_size=2)
        async with sender.running_in_background():
            for hit in hits(5):
                sender.submit(hit)
            assert await sender.aflush(DEADLINE)
            assert sender._transport.owned is not None
            client = sender._transport.owned.client
            assert isinstance(client, LeanClient)
        assert client.is_closed
        assert not client._connections
        assert sender.stats.sent == 5
        assert len(collector.wait_for_hits(5)) == 5
        assert {r.elements for r in collector.requests} == {1, 2}


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
async def test_sender_uses_httpx_with_a_proxy(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "http://127.0.0.1:9")
    with Collector(sites=[1]) as collector:
        # http:// is not proxied by HTTPS_PROXY: httpx delivers directly.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        sender = BatchSender(endpoint=collector.tracking_url)
        await sender.send_now(hits(1))
        assert sender._transport.owned is not None
        assert isinstance(sender._transport.owned.client, httpx.AsyncClient)
        await sender.aclose()
        assert sender.stats.sent == 1


def test_httpx_on_trio_and_for_urls_with_credentials() -> None:
    async def fits(url: str) -> bool:
        return _transport._lean_fits(url, anyio.lowlevel.current_token())

    url = "http://127.0.0.1:9/matomo.php"
    assert anyio.run(fits, url)
    assert not anyio.run(fits, url, backend="trio")
    assert not anyio.run(fits, "http://u:p@127.0.0.1:9/matomo.php")


def test_one_lean_client_per_event_loop_closed_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[LeanClient] = []

    class Recorded(LeanClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(_transport, "LeanClient", Recorded)
    with Collector(sites=[1]) as collector:
        sender = BatchSender(endpoint=collector.tracking_url)
        # Starlette's TestClient runs each request in a new event loop.
        anyio.run(sender.send_now, hits(1))
        anyio.run(sender.send_now, hits(1))
        anyio.run(sender.aclose)
        assert len(collector.wait_for_hits(2)) == 2
    assert len(created) == 2
    assert all(c.is_closed and not c._connections for c in created)
    assert sender.stats.sent == 2


async def test_a_fork_child_leaves_the_lean_client_alone() -> None:
    with Collector(sites=[1]) as collector:
        sender = BatchSender(endpoint=collector.tracking_url)
        await sender.send_now(hits(1))
        owned = sender._transport.owned
        assert owned is not None
        assert isinstance(owned.client, LeanClient)
        sender._after_fork_in_child()  # what os.register_at_fork runs in a child
        assert owned in _transport._INHERITED
        assert not owned.client.is_closed
        assert len(owned.client._connections) == 1
        _transport._INHERITED.remove(owned)
        await owned.client.aclose()
        await owned.closer.aclose()


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("after", [b"HTTP/1.1 408 Request Timeout\r\n\r\n", b"\x00garbage"])
async def test_bytes_after_an_answer_in_the_same_read(parser: str, after: bytes) -> None:
    response, reusable = await parse(answer(200, b"ab") + after, parser=parser)
    assert (response.status_code, response.content, reusable) == (200, b"ab", False)


def test_the_parser_option() -> None:
    url = "http://matomo.example.com/matomo.php"
    assert LeanClient(url, parser="h11")._parser == "h11"
    assert LeanClient(url)._parser == _http.PARSER
    with pytest.raises(ValueError, match="parser must be"):
        LeanClient(url, parser="picohttpparser")


def test_request_heads_are_kept_for_reuse_and_bounded() -> None:
    client = LeanClient("http://matomo.example.com/matomo.php")
    head = client._head("http://matomo.example.com/matomo.php", JSON)
    assert client._head("http://matomo.example.com/matomo.php", JSON) is head
    for n in range(3 * _http._MAX_HEADS):
        client._head("http://matomo.example.com/matomo.php", {"X-N": str(n)})
    assert len(client._heads) <= _http._MAX_HEADS
    with pytest.raises(UnicodeEncodeError):  # a ValueError: not latin-1
        client._head("http://matomo.example.com/matomo.php", {"X-A": "\u20ac"})
