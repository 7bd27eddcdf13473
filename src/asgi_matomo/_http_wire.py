"""The wire side of the lean client: request heads out, answers in, without I/O.

A request head is checked and written by h11, once per URL and header set; an
answer is read by httptools (llhttp, in C) where it is installed, else by h11,
the HTTP/1.1 library httpx itself uses. Nothing here parses HTTP by hand. Each
reader holds at most an incomplete response head (MAX_HEAD) and a body up to the
cap it is given.
"""

from __future__ import annotations

import codecs
import zlib
from collections.abc import Iterator, Mapping
from typing import TypeVar, cast, overload

import h11

try:
    import httptools
except ImportError:  # pragma: no cover (installed with uvicorn[standard], and for tests)
    httptools = None  # type: ignore[assignment]

__all__ = [
    "MAX_HEAD",
    "PARSER",
    "LeanConnectionError",
    "LeanHTTPError",
    "LeanHeaders",
    "LeanProtocolError",
    "LeanResponse",
    "Outcome",
    "Reader",
    "RequestHead",
    "field",
    "make_reader",
]

_T = TypeVar("_T")
# A response head larger than this is not an HTTP server we want to talk to.
MAX_HEAD = 64 * 1024
# What reads the answers: httptools where it is installed, h11 (httpx's) otherwise.
PARSER = "httptools" if httptools is not None else "h11"


class LeanHTTPError(Exception):
    """The request failed: the connection broke, or the answer was not HTTP/1.x."""


class LeanConnectionError(LeanHTTPError):
    """The server closed or reset the connection before its answer was complete."""


class LeanProtocolError(LeanHTTPError):
    """The server's answer is not well-formed HTTP/1.x."""


class LeanHeaders(Mapping[str, str]):
    """Response headers with case-insensitive lookups; repeated ones joined by ", "."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        """From the fields as they came: names and values decoded as Latin-1 (as httpx does)."""
        joined = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in fields}
        if len(joined) < len(fields):  # a repeated name: its values joined, in order
            joined = {}
            for n, v in fields:
                key, value = n.decode("latin-1").lower(), v.decode("latin-1")
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
        self._fields = joined

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        # Mapping's own get() goes through __getitem__ and a KeyError: this is read per answer.
        return self._fields.get(name.lower(), default)

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


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo gzip or deflate, which a server may apply despite Accept-Encoding: identity."""
    if encoding is None:
        return body
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        return body  # br, zstd...: kept as received, as httpx does without their packages
    wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS
    try:
        return zlib.decompressobj(wbits).decompress(body, limit)
    except zlib.error as exc:
        raise LeanProtocolError(f"a {coding} body that does not decompress: {exc}") from exc


def field(name: str, value: str) -> tuple[bytes, bytes]:
    # h11 checks both when the request is made (no CR or LF: no header smuggling).
    return name.encode("latin-1"), value.encode("latin-1")


Outcome = tuple[LeanResponse, bool]  # the response, and whether the connection may be reused


def _answer(
    status: int, fields: list[tuple[bytes, bytes]], body: bytearray, limit: int, reusable: bool
) -> Outcome:
    headers = LeanHeaders(fields)
    content = _decode(bytes(body), headers.get("content-encoding"), limit)
    return LeanResponse(status, headers, content), reusable


class RequestHead:
    """A request head as h11 writes it, but for the Content-Length of each request.

    h11 checks every field and writes the head once per URL and header set:
    doing both per request would take half of this client's CPU per POST.
    """

    __slots__ = ("_prefix",)

    def __init__(self, target: str, fields: list[tuple[bytes, bytes]]) -> None:
        try:
            request = h11.Request(
                method=b"POST",
                target=target,
                headers=[*fields, (b"Connection", b"keep-alive"), (b"Content-Length", b"0")],
            )
        except h11.LocalProtocolError as exc:
            # A CR or LF in a header would let it write other headers, or a second request.
            raise ValueError(f"invalid header field: {exc}") from None
        written = h11.Connection(h11.CLIENT).send(request) or b""
        # h11 writes the fields in order: the last one is left open for each request's length.
        end = b"Content-Length: 0\r\n\r\n"
        assert written.endswith(end)
        self._prefix = written[: -len(end)] + b"Content-Length: "

    def frame(self, content: bytes) -> bytes:
        # One write, one segment for a small request: head and body together.
        return b"".join((self._prefix, b"%d\r\n\r\n" % len(content), content))


# What h11 is told of each request: it frames an answer by the request's method
# (a HEAD or CONNECT is read otherwise), its HTTP version and whether it asked to
# close, and every request of this client is an HTTP/1.1 POST that keeps the
# connection open. The fields, written by `RequestHead`, play no part in it.
_REQUEST = h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"matomo")])


class _H11Reader:
    """Reads the answers on one connection with h11, each with an h11 connection of its own.

    A new h11.Connection per answer costs less than start_next_cycle() on the
    last one and the end of a request h11 would never write: a connection is
    only used again once its answer is complete and nothing came after it, so
    there is nothing to carry over from one answer to the next.
    """

    def __init__(self, max_body: int) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._max_body = max_body
        self._response: h11.Response | None = None
        self._body = bytearray()

    def begin(self) -> None:
        """A request was sent: its answer comes next."""
        framer = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        framer.send(_REQUEST)
        self._h11 = framer
        self._response = None
        self._body = bytearray()

    def feed(self, data: bytes) -> Outcome | None:
        self._h11.receive_data(data)
        return self._read()

    def end(self) -> Outcome | None:
        self._h11.receive_data(b"")
        return self._read()

    def _read(self) -> Outcome | None:
        framer = self._h11
        try:
            while True:
                event = framer.next_event()
                # Exact types: isinstance() goes through ABCMeta for h11's events.
                kind = type(event)
                if kind is h11.Response:
                    self._response = cast("h11.Response", event)
                elif kind is h11.Data:
                    if not _keep(self._body, cast("h11.Data", event).data, self._max_body):
                        return self._answer(reusable=False)
                elif kind is h11.EndOfMessage:
                    after, closed = framer.trailing_data
                    return self._answer(
                        # Not for Connection: close or HTTP/1.0, nor bytes after the answer.
                        reusable=framer.their_state is h11.DONE and not after and not closed
                    )
                elif event is h11.NEED_DATA or event is h11.PAUSED:
                    return None
                # else an interim answer (100 Continue, 103 Early Hints): the final one follows.
        except h11.RemoteProtocolError as exc:
            raise LeanProtocolError(f"not a well-formed HTTP/1.1 answer: {exc}") from None

    def _answer(self, *, reusable: bool) -> Outcome:
        response = self._response
        assert response is not None  # h11 gives the head before any body
        fields = response.headers.raw_items()
        return _answer(response.status_code, fields, self._body, self._max_body, reusable)


class _HttptoolsReader:
    """Reads answers with httptools (llhttp, in C): a tenth of h11's CPU per answer.

    httptools has no end-of-input call: a body that ends with the connection is
    recognised here from the head, as RFC 9112 6.3 frames it.
    """

    def __init__(self, max_body: int) -> None:
        assert httptools is not None
        self._parser = httptools.HttpResponseParser(self)
        self._max_body = max_body
        self._reset()

    def _reset(self) -> None:
        self._fields: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._status = 0  # set once the head is complete
        self._head_size = 0
        # Bytes after the head that are not body: chunk sizes and extensions, and
        # trailers, which httptools gathers in memory as they come.
        self._framing = 0
        self._seen = 0  # body bytes the parser handed over, kept or not
        self._cut = False  # the body went over the cap
        self._done = False
        self._keep_alive = False
        self._after = False  # bytes came after the answer

    def begin(self) -> None:
        """A request was sent: its answer comes next."""
        self._reset()

    # -- httptools' callbacks

    def on_message_begin(self) -> None:
        if self._done:
            self._after = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailers (after a chunked body, the head complete) are not the answer's fields.
        if not self._done and not self._status:
            self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        if not self._done:
            self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._seen += len(body)
        if not self._done and not self._cut:
            self._cut = not _keep(self._body, body, self._max_body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        if self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self._fields = []
            self._status = 0
            return
        self._done = True
        # Read here: the parser forgets it once it is past the message.
        self._keep_alive = self._parser.should_keep_alive()

    # --

    def feed(self, data: bytes) -> Outcome | None:
        in_head = not self._status
        if in_head:
            self._head_size += len(data)
        seen = self._seen
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise LeanProtocolError("the server switched protocols (HTTP 101)") from None
        except httptools.HttpParserError as exc:
            if not self._done:
                raise LeanProtocolError(f"not a well-formed HTTP/1.1 answer: {exc}") from None
            self._after = True  # garbage after a complete answer
        if self._done or self._cut:
            reusable = self._done and self._keep_alive and not self._cut and not self._after
            return _answer(self._status, self._fields, self._body, self._max_body, reusable)
        if not self._status and self._head_size > MAX_HEAD:
            raise LeanProtocolError(f"a response head larger than {MAX_HEAD} bytes")
        if not in_head:
            self._framing += len(data) - (self._seen - seen)
            if self._framing > MAX_HEAD + self._max_body:
                raise LeanProtocolError(
                    f"chunk framing and trailers larger than {MAX_HEAD + self._max_body} bytes"
                )
        return None

    def end(self) -> Outcome | None:
        if self._status and self._status not in (204, 304):
            names = LeanHeaders(self._fields)
            encoding = names.get("transfer-encoding", "").lower()
            if "content-length" not in names and not encoding.endswith("chunked"):
                return _answer(self._status, self._fields, self._body, self._max_body, False)
        raise LeanProtocolError("the answer is incomplete")


def _keep(body: bytearray, data: bytes | bytearray, limit: int) -> bool:
    """Add `data` to `body` up to `limit` bytes; False when the limit cut it."""
    room = limit - len(body)
    if len(data) <= room:
        body += data
        return True
    body += data[:room]
    return False


Reader = _H11Reader | _HttptoolsReader


def make_reader(parser: str, max_body: int) -> Reader:
    """The reader of the answers on one connection, with `parser` ("httptools" or "h11")."""
    return _HttptoolsReader(max_body) if parser == "httptools" else _H11Reader(max_body)
