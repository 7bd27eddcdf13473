"""A lean HTTP/1.1 client for the sender's bulk POSTs on asyncio.

httpx spends about 1 ms of CPU per request (client, connection pool, anyio
streams, h11): at 100 hits per batch that is the largest single cost of tracking
in the application's process. The sender only ever POSTs a JSON body to one URL
and reads a small answer, so this client does exactly that with asyncio's
Protocol/Transport API: one write per request, the answer read from the bytes
the loop hands over, no task and no stream object in between. The saving is in
the layers skipped, not in the parsing: request heads are written by h11 and
answers read by httptools or h11 (`_http_wire`); this module holds the
connections.

What it covers: keep-alive with a small pool of idle connections, bodies framed
by Content-Length, chunked or the end of the connection, 1xx interim answers,
TLS verified against the same trust store as httpx's default. What it leaves to
httpx (the sender keeps httpx for those): proxies, credentials in the URL,
URLs that need encoding, trio.

Every buffer is bounded whatever the server does: the parser keeps at most an
incomplete response head (MAX_HEAD), a body is kept up to `max_body`, and a
connection that sends bytes while no request waits for them is closed.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections.abc import Callable, Mapping
from typing import cast
from urllib.parse import SplitResult, urlsplit

from ._http_wire import (
    MAX_HEAD,
    PARSER,
    LeanConnectionError,
    LeanHeaders,
    LeanHTTPError,
    LeanProtocolError,
    LeanResponse,
    Outcome,
    RequestHead,
    field,
    make_reader,
)

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "PARSER",
    "LeanClient",
    "LeanConnectionError",
    "LeanHTTPError",
    "LeanHeaders",
    "LeanProtocolError",
    "LeanResponse",
    "supports",
]

# The part of an answer kept; the rest is not read and its connection is closed.
# Matomo's bulk answer is a few hundred bytes; a misconfigured URL may serve a page.
MAX_BODY = 1024 * 1024
# Idle connections older than this are not reused: httpx's default keep-alive
# expiry, and Apache's default KeepAliveTimeout, after which it closes them.
KEEPALIVE_EXPIRY = 5.0
DEFAULT_MAX_IDLE = 4
# RFC 8305's recommended delay before trying the next address (IPv6, then IPv4).
_HAPPY_EYEBALLS_DELAY = 0.25
# aclose() waits this long for aborted transports to report connection_lost.
_CLOSE_WAIT = 1.0
_MAX_HEADS = 16  # request heads kept ready, by URL and headers
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers this client writes itself from the request: a caller's are ignored.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# The request target is sent as it is: printable ASCII, no spaces. Anything else
# would need percent-encoding, which httpx does and this client leaves to it.
_TARGET = re.compile(r"[\x21-\x7e]*")


def _split(url: str) -> SplitResult:
    """The parts of a URL this client can send to as they are; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL are not supported")
    host = parts.hostname
    if not host or not host.isascii():
        raise ValueError(f"no host, or a host that needs IDNA encoding: {url!r}")
    if parts.port == 0:  # .port raises ValueError itself for one that is not 0-65535
        raise ValueError(f"port 0 in {url!r}")
    if not _TARGET.fullmatch(_target(parts, url)):
        raise ValueError(f"the path or query needs percent-encoding: {url!r}")
    return parts


def _target(parts: SplitResult, url: str) -> str:
    """The request target: the URL's path and query byte for byte, without the fragment."""
    rest = url.split("#", 1)[0]
    rest = rest[rest.index(parts.netloc, len(parts.scheme)) + len(parts.netloc) :]
    return rest if rest.startswith("/") else "/" + rest


def supports(url: str) -> bool:
    """Whether `LeanClient` can send to `url` exactly as httpx would."""
    try:
        _split(url)
    except ValueError:
        return False
    return True


def _ssl_context() -> ssl.SSLContext:
    """Verification on, with httpx's default trust store: SSL_CERT_FILE, SSL_CERT_DIR, certifi."""
    if os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        import certifi  # installed with httpx; imported only when a URL is https

        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Connection(asyncio.Protocol):
    """One connection: its reader parses the answer as the loop hands the bytes over.

    The bytes are parsed where they arrive, so nothing piles up between the loop
    and a waiting task: the parser holds at most an incomplete response head
    (MAX_HEAD), the body is kept up to the client's cap, and a connection that
    sends anything while no request waits for an answer is closed at once,
    nothing of it kept. The caller waits on a future that gets the answer or
    the error.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[_Connection], None],
        max_body: int = MAX_BODY,
        parser: str = PARSER,
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = make_reader(parser, max_body)
        self.eof = False  # no more bytes will arrive
        self.error: Exception | None = None  # why the connection was lost, if not cleanly
        self.received = False  # a byte of the current answer arrived
        self.idle_since = 0.0
        self.timed_out = False
        # The deadline of the exchange in flight, and the one timer that enforces it.
        self.deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it comes due (TimerHandle.when() is a call)
        self.lost: asyncio.Future[None] = loop.create_future()
        # The answer to the request in flight, or the error that ended it.
        self.answer: asyncio.Future[Outcome] | None = None
        self._on_lost = on_lost
        self._aborted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send(self, head: RequestHead, content: bytes) -> bytes:
        """The bytes of the request; from now on an answer is awaited."""
        self.reader.begin()
        self.received = False
        self.answer = self.loop.create_future()
        return head.frame(content)

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or answer.done():
            # Nothing was asked: a server that talks now is not one to trust with
            # the next request, and what it sends would only pile up.
            self.abort()
            return
        self.received = True
        try:
            result = self.reader.feed(data)
        except LeanProtocolError as exc:
            self._fail(answer, exc)
            return
        if result is not None:
            answer.set_result(result)

    def eof_received(self) -> bool:
        self._end()
        # Returning False lets the transport close itself.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        if exc is None and not self._aborted:
            self._end()  # a clean end that eof_received did not report (TLS)
        answer = self.answer
        if answer is not None and not answer.done():
            self._fail(answer, self.closed_error(self._where()))
        self.eof = True
        if self._timer is not None:
            self._timer.cancel()
        self.lost.set_result(None)  # the loop calls this once
        self._on_lost(self)

    def _end(self) -> None:
        """The server ended the connection: that may end a body framed by it."""
        if self.eof:
            return
        self.eof = True
        answer = self.answer
        if answer is None or answer.done():
            return
        try:
            result = self.reader.end()
        except LeanProtocolError:
            self._fail(answer, self.closed_error(self._where()))
            return
        if result is not None:
            answer.set_result(result)

    def _fail(self, answer: asyncio.Future[Outcome], error: Exception) -> None:
        answer.set_exception(error)
        self.abort()

    def _where(self) -> str:
        return "in the middle of its answer" if self.received else "before its answer"

    def arm(self, deadline: float) -> None:
        """Time the exchange out at `deadline` (TimeoutError, the connection dropped).

        One timer per connection, not one per exchange: a timer made and
        cancelled per POST costs about as much as reading the answer with
        httptools. A timer that comes due before the deadline of the exchange
        then in flight sets itself again for that deadline (one with no
        exchange in flight just ends): the sender's deadlines only move later,
        so a busy connection sets its timer once per timeout, not once per POST.
        """
        self.deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._due, deadline)
            self._timer_at = deadline

    def _due(self, when: float) -> None:
        self._timer = None
        deadline = self.deadline
        if deadline is None:  # no exchange in flight
            return
        if deadline <= when:
            self.time_out()
        else:
            self._timer = self.loop.call_at(deadline, self._due, deadline)
            self._timer_at = deadline

    def time_out(self) -> None:
        """The deadline of the exchange passed: fail the answer with TimeoutError, drop the line."""
        self.timed_out = True
        answer = self.answer
        if answer is not None and not answer.done():
            answer.set_exception(TimeoutError("no complete answer within the timeout"))
        self.abort()

    def closed_error(self, what: str) -> LeanConnectionError:
        reason = f": {self.error!r}" if self.error is not None else ""
        return LeanConnectionError(f"the server closed the connection {what}{reason}")

    def reusable(self, now: float, expiry: float) -> bool:
        """An idle connection the server has not closed (nor talked on: that closes it)."""
        transport = self.transport
        return (
            transport is not None
            and not self.eof
            and not transport.is_closing()
            and now - self.idle_since < expiry
        )

    def abort(self) -> None:
        self._aborted = True
        if self.transport is not None:
            self.transport.abort()


class LeanClient:
    """POSTs to one origin over HTTP/1.1 keep-alive connections; asyncio only.

    Parameters:
        url: the endpoint; it fixes the origin (scheme, host, port) of every request.
        headers: sent with every request (a request's own headers win).
        max_idle: idle connections kept open for reuse; more are closed.
        max_body: bytes of an answer kept; a longer answer is cut and its
            connection closed.
        keepalive_expiry: seconds an idle connection is kept for reuse.
        parser: what reads the answers, "httptools" (the default where it is
            installed) or "h11"; h11 frames the requests either way.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_idle: int = DEFAULT_MAX_IDLE,
        max_body: int = MAX_BODY,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        parser: str = PARSER,
    ) -> None:
        if parser not in ("h11", "httptools") or (parser == "httptools" and parser != PARSER):
            raise ValueError(f"parser must be 'h11' or (when installed) 'httptools': {parser!r}")
        self._parser = parser
        parts = _split(url)
        self._url = url
        self._origin = (parts.scheme, parts.hostname, parts.port)
        self._tls = parts.scheme == "https"
        host = parts.hostname
        assert host is not None  # _split checked
        self._host = host
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._target = _target(parts, url)
        netloc = f"[{host}]" if ":" in host else host
        if self._port != _DEFAULT_PORTS[parts.scheme]:
            netloc = f"{netloc}:{self._port}"
        self._host_field = field("Host", netloc)
        self._defaults: dict[str, tuple[bytes, bytes]] = {
            "accept": (b"Accept", b"*/*"),
            "accept-encoding": (b"Accept-Encoding", b"identity"),
        }
        for name, value in (headers or {}).items():
            if name.lower() not in _FRAMING:
                self._defaults[name.lower()] = field(name, value)
        self._max_idle = max_idle
        self._max_body = max_body
        self._expiry = keepalive_expiry
        self._ssl: ssl.SSLContext | None = None
        # Most recently used last: it is the one least likely to have timed out.
        self._idle: list[_Connection] = []
        # Every connection whose transport is not gone yet, idle or in use.
        self._connections: set[_Connection] = set()
        self._closed = False
        # Heads by (url, headers): the sender uses one, for every request.
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], RequestHead] = {}
        self._head(url, None)  # the headers given are checked now

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> LeanResponse:
        """Send `content` to `url` (of the client's origin) and read the answer.

        A connection that was reused and failed before any byte of the answer
        arrived is most likely one the server closed as idle: the request is sent
        once more on a new connection, as httpcore does.

        `timeout` bounds the whole exchange (TimeoutError). It is a timer on the
        loop that drops the connection, not a cancel scope: anyio's costs more CPU
        than the rest of a POST on this client.
        """
        if self._closed:
            raise LeanHTTPError("the client is closed")
        head = self._head(url, headers)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout is None else now + timeout
        conn = self._take_idle(now)
        if conn is not None:
            response = await self._exchange(conn, head, content, reused=True, deadline=deadline)
            if response is not None:
                return response
        if deadline is None:
            conn = await self._connect()
        else:
            try:
                conn = await asyncio.wait_for(self._connect(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                # (Not the builtin TimeoutError before Python 3.11.)
                raise TimeoutError("no connection within the timeout") from None
        response = await self._exchange(conn, head, content, reused=False, deadline=deadline)
        assert response is not None
        return response

    async def aclose(self) -> None:
        """Close every connection, idle or in use; the client cannot be used after."""
        self._closed = True
        self._idle.clear()
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        if connections:
            # connection_lost comes on a later loop iteration: wait for it, so the
            # sockets are closed before the loop may end.
            await asyncio.wait([conn.lost for conn in connections], timeout=_CLOSE_WAIT)

    def _head(self, url: str, headers: Mapping[str, str] | None) -> RequestHead:
        """The request head for `url` with `headers`; ValueError for a field h11 refuses."""
        key = (url, tuple(headers.items()) if headers else ())
        head = self._heads.get(key)
        if head is not None:
            return head
        if url == self._url:
            target = self._target
        else:
            parts = _split(url)
            if (parts.scheme, parts.hostname, parts.port) != self._origin:
                raise ValueError(f"this client sends to {self._url!r} only, not {url!r}")
            target = _target(parts, url)
        fields = self._defaults
        if headers:
            fields = dict(fields)
            for name, value in headers.items():
                if name.lower() not in _FRAMING:
                    fields[name.lower()] = field(name, value)
        head = RequestHead(target, [self._host_field, *fields.values()])
        if len(self._heads) >= _MAX_HEADS:
            self._heads.clear()  # a caller that varies its headers: bounded all the same
        self._heads[key] = head
        return head

    def _take_idle(self, now: float) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now, self._expiry):
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._tls and self._ssl is None:
            self._ssl = _ssl_context()
        context = self._ssl if self._tls else None
        server_hostname = self._host if self._tls else None
        try:
            conn = await self._open(loop, context, server_hostname)
        except ssl.SSLCertVerificationError as exc:
            # Kept as the cause: the sender looks for it to say what to set.
            raise LeanConnectionError(
                f"certificate verification failed for {self._host}: {exc.verify_message}"
            ) from exc
        self._connections.add(conn)
        if self._closed:  # aclose() ran while connecting
            conn.abort()
            raise LeanHTTPError("the client is closed")
        return conn

    async def _open(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> _Connection:
        if isinstance(loop, asyncio.BaseEventLoop):
            # asyncio's own loops try the host's addresses in parallel when asked.
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self._forget, self._max_body, self._parser),
                self._host,
                self._port,
                ssl=context,
                server_hostname=server_hostname,
                happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
            )
        else:
            # Other loops (uvloop, which `uvicorn[standard]` runs) take no such
            # argument: a TypeError on every connection. They try one by one.
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self._forget, self._max_body, self._parser),
                self._host,
                self._port,
                ssl=context,
                server_hostname=server_hostname,
            )
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn in self._idle:  # closed while idle: by the server, or for talking
            self._idle.remove(conn)

    async def _exchange(
        self,
        conn: _Connection,
        head: RequestHead,
        content: bytes,
        *,
        reused: bool,
        deadline: float | None = None,
    ) -> LeanResponse | None:
        """The answer to the request on `conn`; None when a reused connection turned out dead."""
        transport = conn.transport
        assert transport is not None
        if deadline is not None:
            conn.arm(deadline)
        try:
            # Written at once: the transport buffers what the socket does not take
            # and sends it as the socket drains; the answer comes after it anyway.
            transport.write(conn.send(head, content))
            answer = conn.answer
            assert answer is not None
            response, keep_alive = await answer
        except BaseException as exc:
            # Cancelled (a timeout) or failed: the state of the connection is unknown.
            conn.abort()
            if conn.timed_out:
                if isinstance(exc, TimeoutError):
                    raise
                raise TimeoutError("no complete answer within the timeout") from exc
            if reused and not conn.received and isinstance(exc, (OSError, LeanConnectionError)):
                return None
            raise
        finally:
            conn.deadline = None
        if (
            keep_alive
            and not self._closed
            and not conn.eof
            and not transport.is_closing()  # it talked after its answer, or timed out
            and not transport.get_write_buffer_size()  # answered before reading it all
            and len(self._idle) < self._max_idle
        ):
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.abort()
        return response
