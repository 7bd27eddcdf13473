"""A lean HTTP/1.1 client for the sender's bulk POSTs on asyncio.

httpx spends about 1 ms of CPU per request (client, connection pool, anyio
streams, h11): at 100 hits per batch that is the largest single cost of tracking
in the application's process. The sender only ever POSTs a JSON body to one URL
and reads a small answer, so this client does exactly that with asyncio's
Protocol/Transport API: one write per request, the answer parsed from the
bytes the loop hands over, no task and no stream object in between.

What it covers: keep-alive with a small pool of idle connections, bodies framed
by Content-Length, chunked or the end of the connection, 1xx interim answers,
TLS verified against the same trust store as httpx's default. What it leaves to
httpx (the sender keeps httpx for those): proxies, credentials in the URL,
URLs that need encoding, trio.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
import ssl
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import cast
from urllib.parse import SplitResult, urlsplit

__all__ = [
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
# A response head larger than this is not an HTTP server we want to talk to.
MAX_HEAD = 64 * 1024
_MAX_LINE = 8 * 1024  # a chunk-size or trailer line
# Idle connections older than this are not reused: httpx's default keep-alive
# expiry, and Apache's default KeepAliveTimeout, after which it closes them.
KEEPALIVE_EXPIRY = 5.0
DEFAULT_MAX_IDLE = 4
# RFC 8305's recommended delay before trying the next address (IPv6, then IPv4).
_HAPPY_EYEBALLS_DELAY = 0.25
# aclose() waits this long for aborted transports to report connection_lost.
_CLOSE_WAIT = 1.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers this client writes itself from the request: a caller's are ignored.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# The request target is sent as it is: printable ASCII, no spaces. Anything else
# would need percent-encoding, which httpx does and this client leaves to it.
_TARGET = re.compile(r"[\x21-\x7e]*")


class LeanHTTPError(Exception):
    """The request failed: the connection broke, or the answer was not HTTP/1.x."""


class LeanConnectionError(LeanHTTPError):
    """The server closed or reset the connection before its answer was complete."""


class LeanProtocolError(LeanHTTPError):
    """The server's answer is not well-formed HTTP/1.x."""


class LeanHeaders(Mapping[str, str]):
    """Response headers with case-insensitive lookups; repeated ones joined by ", "."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        joined: dict[str, str] = {}
        for name, value in fields:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        self._fields = joined

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"LeanHeaders({self._fields!r})"


class LeanResponse:
    """What the sender reads from an answer, named as httpx names it."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: LeanHeaders, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        """The body decoded per the Content-Type's charset, else UTF-8 (as httpx does)."""
        return self.content.decode(_charset(self.headers.get("content-type")), errors="replace")

    def __repr__(self) -> str:
        return f"<LeanResponse [{self.status_code}]>"


def _charset(content_type: str | None) -> str:
    if content_type:
        for param in content_type.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                try:
                    return codecs.lookup(value.strip().strip("\"'")).name
                except LookupError:
                    break
    return "utf-8"


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


def _encode_field(name: str, value: str) -> str:
    if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
        # A CR or LF in a header would let it write other headers, or a second request.
        raise ValueError(f"invalid header field {name!r}")
    return f"{name}: {value}\r\n"


class _Connection(asyncio.Protocol):
    """One connection: collects the bytes the loop hands over, wakes the reader.

    The client reads the answer in its own task from `buffer`; the protocol only
    records what happened, so a connection the server closed while it sat idle
    is known to be dead before anyone writes to it.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[_Connection], None]
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False  # no more bytes will arrive
        self.error: Exception | None = None  # why the connection was lost, if not cleanly
        self.received = False  # a byte of the current answer arrived
        self.idle_since = 0.0
        self.timed_out = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self._on_lost = on_lost
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received = True
        self._wake()

    def eof_received(self) -> bool:
        # Returning False lets the transport close itself.
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self.lost.set_result(None)  # the loop calls this once
        self._wake()
        self._on_lost(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until more bytes arrived or the server is gone (returns at once if it is)."""
        if self.eof:  # pragma: no cover (callers check first; never wait for nothing)
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def time_out(self) -> None:
        """The deadline of the exchange passed: wake the reader with TimeoutError, drop the line."""
        self.timed_out = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError("no complete answer within the timeout"))
        self.abort()

    def closed_error(self, what: str) -> LeanConnectionError:
        reason = f": {self.error!r}" if self.error is not None else ""
        return LeanConnectionError(f"the server closed the connection {what}{reason}")

    def reusable(self, now: float, expiry: float) -> bool:
        """An idle connection the server has not closed, and that sent nothing unasked."""
        transport = self.transport
        return (
            transport is not None
            and not self.eof
            and not transport.is_closing()
            and not self.buffer
            and now - self.idle_since < expiry
        )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _read_line(conn: _Connection, what: str) -> bytes:
    buffer = conn.buffer
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line[:-1] if line.endswith(b"\r") else line
        if len(buffer) > _MAX_LINE:
            raise LeanProtocolError(f"{what} longer than {_MAX_LINE} bytes")
        if conn.eof:
            raise conn.closed_error(f"in the middle of the {what}")
        await conn.wait()


async def _read_head(conn: _Connection) -> tuple[int, bool, LeanHeaders]:
    """(status, HTTP/1.1?, headers) of the next answer in the connection's bytes."""
    buffer = conn.buffer
    while True:
        # The head ends with an empty line; bare LF line ends are tolerated (RFC 9112 2.2).
        crlf, lf = buffer.find(b"\n\r\n"), buffer.find(b"\n\n")
        end = min(crlf, lf) if crlf >= 0 and lf >= 0 else max(crlf, lf)
        if end >= 0 or len(buffer) > MAX_HEAD:
            break
        if conn.eof:
            raise conn.closed_error("before its answer" if not buffer else "in a response head")
        await conn.wait()
    if end < 0 or end > MAX_HEAD:
        raise LeanProtocolError(f"response head larger than {MAX_HEAD} bytes")
    head = bytes(buffer[:end])
    del buffer[: end + (3 if end == crlf else 2)]
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    while lines and not lines[0]:
        lines.pop(0)  # empty lines before the status line may be ignored (RFC 9112 2.2)
    status_line = lines[0] if lines else b""
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or rest[3:4] not in (b"", b" ")
    ):
        raise LeanProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # Obsolete line folding: the line continues the previous value.
            if not fields:
                raise LeanProtocolError("a folded header line without a header before it")
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip().decode('latin-1')}".strip())
            continue
        raw_name, colon, raw_value = line.partition(b":")
        name = raw_name.decode("latin-1")
        if not colon or not _TOKEN.fullmatch(name):
            raise LeanProtocolError(f"malformed header line: {line[:80]!r}")
        fields.append((name, raw_value.strip().decode("latin-1")))
    return int(code), version == b"HTTP/1.1", LeanHeaders(fields)


async def _read_sized(conn: _Connection, size: int, limit: int) -> tuple[bytes, bool]:
    """(body, complete) of a Content-Length body; at most `limit` bytes are read."""
    buffer = conn.buffer
    want = min(size, limit)
    while len(buffer) < want:
        if conn.eof:
            raise conn.closed_error(f"after {len(buffer)} of {size} body bytes")
        await conn.wait()
    body = bytes(buffer[:want])
    del buffer[:want]
    return body, want == size


async def _read_chunked(conn: _Connection, limit: int) -> tuple[bytes, bool]:
    """(body, complete) of a chunked body; stops keeping at `limit` bytes."""
    body = bytearray()
    while True:
        line = await _read_line(conn, "chunk size line")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 16:
            raise LeanProtocolError(f"malformed chunk size line: {line[:80]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            keep, _ = await _read_sized(conn, limit - len(body), limit)
            return bytes(body + keep), False
        chunk, _ = await _read_sized(conn, size, size)
        body += chunk
        if await _read_line(conn, "chunk end") != b"":
            raise LeanProtocolError("chunk data longer than its size")
    while await _read_line(conn, "trailer line") != b"":
        pass  # trailers are not used
    return bytes(body), True


async def _read_to_close(conn: _Connection, limit: int) -> tuple[bytes, bool]:
    """(body, complete) of a body that ends with the connection."""
    buffer = conn.buffer
    while not conn.eof and len(buffer) <= limit:
        await conn.wait()
    if conn.error is not None and len(buffer) <= limit:
        # A reset, not an end: the body may be cut short.
        raise conn.closed_error(f"after {len(buffer)} body bytes")
    body = bytes(buffer[:limit])
    complete = len(buffer) <= limit
    buffer.clear()
    return body, complete


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo gzip or deflate, which a server may apply despite Accept-Encoding: identity."""
    coding = (encoding or "").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        return body  # br, zstd...: kept as received, as httpx does without their packages
    wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS
    try:
        return zlib.decompressobj(wbits).decompress(body, limit)
    except zlib.error as exc:
        raise LeanProtocolError(f"a {coding} body that does not decompress: {exc}") from exc


async def _read_response(conn: _Connection, limit: int) -> tuple[LeanResponse, bool]:
    """The final answer on `conn`, and whether the connection may carry another request."""
    while True:
        status, http11, headers = await _read_head(conn)
        if status >= 200:
            break
        if status == 101:
            raise LeanProtocolError("the server switched protocols (HTTP 101)")
        # 100 Continue, 103 Early Hints: the final answer follows.
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep_alive = http11 and "close" not in connection
    encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if status in (204, 304):
        body, complete = b"", True
    elif encoding is not None:
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
        if encoding.rsplit(",", 1)[-1].strip().lower() == "chunked":
            body, complete = await _read_chunked(conn, limit)
        else:
            body, complete = await _read_to_close(conn, limit)
            keep_alive = False
    elif length is not None:
        values = {value.strip() for value in length.split(",")}
        size_text = values.pop() if len(values) == 1 else ""
        if not size_text.isdigit() or not size_text.isascii() or len(size_text) > 18:
            raise LeanProtocolError(f"invalid Content-Length: {length[:40]!r}")
        body, complete = await _read_sized(conn, int(size_text), limit)
    else:
        body, complete = await _read_to_close(conn, limit)
        keep_alive = False
    body = _decode(body, headers.get("content-encoding"), limit)
    return LeanResponse(status, headers, body), keep_alive and complete


class LeanClient:
    """POSTs to one origin over HTTP/1.1 keep-alive connections; asyncio only.

    Parameters:
        url: the endpoint; it fixes the origin (scheme, host, port) of every request.
        headers: sent with every request (a request's own headers win).
        max_idle: idle connections kept open for reuse; more are closed.
        max_body: bytes of an answer kept; a longer answer is cut and its
            connection closed.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_idle: int = DEFAULT_MAX_IDLE,
        max_body: int = MAX_BODY,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
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
        self._host_field = _encode_field("Host", netloc)
        self._defaults: dict[str, str] = {
            "accept": "Accept: */*\r\n",
            "accept-encoding": "Accept-Encoding: identity\r\n",
        }
        for name, value in (headers or {}).items():
            if name.lower() not in _FRAMING:
                self._defaults[name.lower()] = _encode_field(name, value)
        self._max_idle = max_idle
        self._max_body = max_body
        self._expiry = keepalive_expiry
        self._ssl: ssl.SSLContext | None = None
        # Most recently used last: it is the one least likely to have timed out.
        self._idle: list[_Connection] = []
        # Every connection whose transport is not gone yet, idle or in use.
        self._connections: set[_Connection] = set()
        self._closed = False

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
        request = self._request(url, content, headers)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        conn = self._take_idle()
        if conn is not None:
            response = await self._exchange(conn, request, reused=True, deadline=deadline)
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
        response = await self._exchange(conn, request, reused=False, deadline=deadline)
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

    def _request(self, url: str, content: bytes, headers: Mapping[str, str] | None) -> bytes:
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
                    fields[name.lower()] = _encode_field(name, value)
        head = (
            f"POST {target} HTTP/1.1\r\n{self._host_field}{''.join(fields.values())}"
            f"Connection: keep-alive\r\nContent-Length: {len(content)}\r\n\r\n"
        )
        # One write, one segment for a small request: headers and body together.
        return head.encode("latin-1") + content

    def _take_idle(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
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
        ssl = self._ssl if self._tls else None
        server_hostname = self._host if self._tls else None
        if isinstance(loop, asyncio.BaseEventLoop):
            # asyncio's own loops try the host's addresses in parallel when asked.
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self._forget),
                self._host,
                self._port,
                ssl=ssl,
                server_hostname=server_hostname,
                happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
            )
        else:
            # Other loops (uvloop, which `uvicorn[standard]` runs) take no such
            # argument: a TypeError on every connection. They try one by one.
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self._forget),
                self._host,
                self._port,
                ssl=ssl,
                server_hostname=server_hostname,
            )
        self._connections.add(conn)
        if self._closed:  # aclose() ran while connecting
            conn.abort()
            raise LeanHTTPError("the client is closed")
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    async def _exchange(
        self, conn: _Connection, request: bytes, *, reused: bool, deadline: float | None = None
    ) -> LeanResponse | None:
        """The answer to `request` on `conn`; None when a reused connection turned out dead."""
        transport = conn.transport
        assert transport is not None
        conn.received = False
        timer = None if deadline is None else conn.loop.call_at(deadline, conn.time_out)
        try:
            # Written at once: the transport buffers what the socket does not take
            # and sends it as the socket drains; the answer comes after it anyway.
            transport.write(request)
            response, keep_alive = await _read_response(conn, self._max_body)
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
            if timer is not None:
                timer.cancel()
        if (
            keep_alive
            and not self._closed
            and not conn.eof
            and not conn.buffer  # bytes after the answer: not a server to trust
            and not transport.get_write_buffer_size()  # answered before reading it all
            and len(self._idle) < self._max_idle
        ):
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.abort()
        return response
