"""The sender's HTTP side: which client posts a bulk request, and what came back.

One client per event loop (Starlette's TestClient runs each request in a new
loop, and connections belong to the loop that opened them): the lean HTTP/1.1
client of `_http` on asyncio, httpx where a proxy is configured, the URL holds
credentials, or the loop is trio; or the user's own httpx client, never closed
here. An answer is handed to `_bulk.read_answer` for its verdict.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx

from ._bulk import Answer, Kind, bulk_body, read_answer
from ._hit import Hit
from ._http import LeanClient, supports
from ._version import __version__

__all__ = ["Client", "Transport"]

_CLOSE_TIMEOUT = 1.0
_HEADERS = {"Content-Type": "application/json"}
_CLIENT_HEADERS = {"User-Agent": f"asgi-matomo/{__version__}"}

logger = logging.getLogger("asgi_matomo")

Client = httpx.AsyncClient | LeanClient


@dataclass(frozen=True, slots=True)
class _OwnedClient:
    loop: anyio.lowlevel.EventLoopToken
    client: Client
    closer: AsyncGenerator[None, None]


# Clients inherited through a fork: the child must never close (nor let the
# garbage collector finalize) connections that belong to its parent.
_INHERITED: list[_OwnedClient] = []


class Transport:
    """Posts bulk requests to `endpoint` and reads the answers; never raises."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None,
        client: httpx.AsyncClient | None,
        http_timeout: float,
        max_idle: int,
        wall_clock: Callable[[], float],
    ) -> None:
        self._endpoint = endpoint
        self._token = token
        self._user_client = client
        self._http_timeout = http_timeout
        self._max_idle = max_idle
        self._wall_clock = wall_clock
        self.owned: _OwnedClient | None = None
        self._told_certificate = False

    async def post(self, hits: list[Hit], *, authenticated: bool) -> Answer:
        """One bulk request of `hits`, with the token when `authenticated`."""
        content = bulk_body(
            [h.encode(authenticated=authenticated) for h in hits],
            self._token if authenticated else None,
        )
        try:
            client = await self.client()
            response: Any
            if isinstance(client, LeanClient):
                # Its own timer on the loop: cheaper than a cancel scope per POST.
                response = await client.post(
                    self._endpoint, content=content, headers=_HEADERS, timeout=self._http_timeout
                )
            else:
                # Caps the whole exchange: httpx's own timeout is per operation.
                with anyio.fail_after(self._http_timeout):
                    response = await client.post(self._endpoint, content=content, headers=_HEADERS)
        except TimeoutError:
            return Answer(Kind.RETRY, cause="timeout")
        except Exception as exc:  # connection errors, and whatever a user's client raises
            if _certificate_error(exc) is not None:
                return self._certificate_failed(exc)
            return Answer(Kind.RETRY, cause=type(exc).__name__)
        status = getattr(response, "status_code", None)
        logger.debug("asgi_matomo: bulk request of %d hits answered %s", len(hits), status)
        if not isinstance(status, int) or isinstance(status, bool):
            # A test double, most likely: nothing more of it is read.
            return Answer(Kind.REFUSED, cause="an answer without a status code")
        text = getattr(response, "text", "")
        return read_answer(
            status,
            text if isinstance(text, str) else "",
            len(hits),
            # Headers and the clock are read only by the answers that need them.
            header=lambda name: _header(response, name),
            now=self._wall_clock,
            excerpt=self.excerpt,
            size=_size(response),
        )

    def _certificate_failed(self, exc: Exception) -> Answer:
        """Matomo's TLS certificate is not trusted: say so once, and what to set."""
        host = urlsplit(self._endpoint).hostname or self._endpoint
        if not self._told_certificate:
            self._told_certificate = True
            error = _certificate_error(exc)
            logger.error(
                "asgi_matomo: certificate verification failed for %s (%s): no hit reaches "
                "Matomo until its certificate is trusted (hits are retried, then spooled or "
                "dropped). Set SSL_CERT_FILE (or SSL_CERT_DIR) to a CA bundle that holds "
                "its issuer, or pass client=httpx.AsyncClient(verify=...) to the middleware.",
                host,
                getattr(error, "verify_message", None) or error,
            )
        return Answer(Kind.RETRY, cause=f"certificate verification failed for {host}")

    def excerpt(self, text: str, limit: int) -> str:
        """The start of an answer for a log line: one line, the token masked (before cutting)."""
        text = " ".join(text.split())
        if self._token:
            text = text.replace(self._token, "***")
        return text[:limit]

    async def client(self) -> Client:
        if self._user_client is not None:
            return self._user_client
        # Connections belong to the event loop that opened them, and Starlette's
        # TestClient runs every request in a new loop: one client per loop.
        loop = anyio.lowlevel.current_token()
        if self.owned is not None and self.owned.loop == loop:
            return self.owned.client
        # Matomo falls back to the sender's User-Agent for a hit without `ua` (a
        # visitor that sent none): name this library rather than python-httpx.
        client: Client
        if _lean_fits(self._endpoint, loop):
            # A tenth of httpx's CPU per request; httpx for what it does not cover.
            client = LeanClient(self._endpoint, headers=_CLIENT_HEADERS, max_idle=self._max_idle)
        else:
            client = httpx.AsyncClient(timeout=self._http_timeout, headers=_CLIENT_HEADERS)
        closer = _close_when_loop_ends(client)
        # The previous client, if any, is left to its own loop's closer.
        self.owned = _OwnedClient(loop, client, closer)
        await closer.__anext__()
        return client

    def forget(self) -> None:
        """In a forked child: leave the parent's client alone, never close nor collect it.

        Closing it would shut down TLS sessions the parent is still using.
        """
        if self.owned is not None:
            _INHERITED.append(self.owned)
        self.owned = None

    async def aclose(self) -> None:
        """Close the client we created, when it belongs to the running event loop."""
        owned, self.owned = self.owned, None
        if owned is not None and owned.loop == anyio.lowlevel.current_token():
            await owned.closer.aclose()  # closes the client
        # A client of another event loop is closed by that loop when it ends.


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind `exc` (httpx and the lean client chain it), if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _size(response: object) -> int | None:
    content = getattr(response, "content", None)
    return len(content) if isinstance(content, bytes) else None


def _header(response: object, name: str) -> str | None:
    try:
        headers: Any = getattr(response, "headers", {})
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
    except Exception:  # a duck-typed response: headers is whatever the test double put there
        return None
    return value if isinstance(value, str) else None


def _lean_fits(endpoint: str, loop: anyio.lowlevel.EventLoopToken) -> bool:
    """Whether the lean client sends to `endpoint` exactly as httpx would, in this loop."""
    # asyncio only (anyio's token of an asyncio loop is the loop itself).
    if not isinstance(loop.native_token, asyncio.AbstractEventLoop):
        return False
    # httpx goes through the proxies that urllib finds (environment variables,
    # and the system's settings on macOS and Windows); the lean client does not.
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return False
    return supports(endpoint)


async def _close_when_loop_ends(client: Client) -> AsyncGenerator[None, None]:
    """Closes `client` inside its event loop when that loop finishes.

    In direct mode nothing tells us when a loop ends (TestClient runs each
    request in its own), and a client cannot be closed from another loop: its
    keep-alive sockets would leak. A suspended async generator is finalized by
    the loop itself on the way out (asyncio's shutdown_asyncgens, trio's
    end-of-run finalizer), while the loop can still close sockets.
    """
    try:
        yield
    finally:
        try:
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await client.aclose()
        except Exception as exc:
            logger.debug("asgi_matomo: closing the HTTP client failed: %r", exc)
