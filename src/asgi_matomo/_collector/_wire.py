"""The collector's HTTP glue: the standard library's threading server, bodies read
with a bound, answers written.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asgi_matomo._collector._server import Collector

__all__ = [
    "MAX_BODY",
    "Answer",
    "Handler",
    "Server",
    "json_answer",
    "peer_gone",
    "read_body",
    "shutdown_socket",
    "write",
]

LOGGER = logging.getLogger("asgi_matomo")

MAX_BODY = 32 * 1024 * 1024
# One thread per open connection: a client that opens connections without end
# would otherwise get a thread each. Far more than a sender's pool.
MAX_CONNECTIONS = 256
# A safety net for idle keep-alive connections; stop() closes them anyway.
CONNECTION_TIMEOUT = 60.0


@dataclass
class Answer:
    """What an endpoint answers: status, body, content type and extra headers."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "asgi-matomo-collector"
    timeout = CONNECTION_TIMEOUT
    # Headers and body leave in two writes: with Nagle's algorithm the body
    # would wait for the client's delayed ACK (about 40 ms per answer).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.server.collector._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.collector._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The default access log goes to stderr and would print token_auth from
        # a GET query: requests are logged by the collector without queries.
        pass

    def do_GET(self) -> None:
        self.server.collector._handle(self)

    def do_POST(self) -> None:
        self.server.collector._handle(self)


class Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(): stop() returns only when no
    # request is in flight any more, so a stopped collector stores nothing.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.collector = collector
        self._open: set[Any] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Every request verified here ends in shutdown_request(), whatever happens.
        with self._open_lock:
            full = len(self._open) >= MAX_CONNECTIONS
            if not full:
                self._open.add(request)
        if full:
            self.collector._refusals.refused(
                "connections",
                f"closed a new connection at once: {MAX_CONNECTIONS} connections are open"
                " already (a client that opens connections without closing them?)",
            )
        return not full

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # pragma: no cover - a client that hangs up
            LOGGER.debug("collector: connection error", exc_info=True)
            return
        # Anything else is a bug of ours that cost the sender its answer: said (rate-limited).
        LOGGER.debug("collector: request failed", exc_info=True)
        self.collector._refusals.refused(
            "internal",
            f"a request failed inside the stand-in ({type(error).__name__}: {str(error)[:200]});"
            " the sender got no answer (the traceback is logged at DEBUG level)",
            type(error).__name__,
        )


def json_answer(status: int, data: object) -> Answer:
    return Answer(status, json.dumps(data).encode(), "application/json")


def peer_gone(connection: socket.socket) -> bool:
    """True when the client closed its side of the connection."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # pragma: no cover - a connection reset by the client
        return True


def shutdown_socket(connection: socket.socket) -> None:
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def read_body(handler: Handler) -> bytes | None:
    """The request body, None when it is larger than MAX_BODY."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return _read_chunked(handler)
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY:
        return None
    return handler.rfile.read(length) if length > 0 else b""


def _read_chunked(handler: Handler) -> bytes | None:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = handler.rfile.readline(1024)
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            # Trailers (usually none) end with an empty line.
            while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # pragma: no cover - HTTP clients send no trailers
            return b"".join(chunks)
        total += size
        if total > MAX_BODY:
            return None
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline(1024)


def write(handler: Handler, answer: Answer) -> None:
    handler.send_response(answer.status)
    if answer.content_type is not None:
        handler.send_header("Content-Type", answer.content_type)
    for name, value in answer.headers.items():
        handler.send_header(name, value)
    # 204 and 304 have no body, nor a length.
    if answer.status not in (204, 304):
        handler.send_header("Content-Length", str(len(answer.body)))
    if handler.close_connection:
        handler.send_header("Connection", "close")
    handler.end_headers()
    if answer.status not in (204, 304):
        handler.wfile.write(answer.body)
