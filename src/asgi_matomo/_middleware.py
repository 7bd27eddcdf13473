"""The ASGI middleware: watches each request, hands finished hits to the sender."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from asgi_matomo import _sender
from asgi_matomo._config import (
    DEFAULT_IGNORED_METHODS,
    build_config,
    function,
    positive_int,
    positive_number,
    tracking_endpoint,
)
from asgi_matomo._config import access_token as _check_token
from asgi_matomo._core import (
    RequestInfo,
    build_hits,
    inspect_request,
    route_template,
)
from asgi_matomo._hit import Hit
from asgi_matomo._state import current_state, fresh_state, read_overrides
from asgi_matomo._types import AnyASGIApp, ASGIApp, Message, Receive, Scope, Send
from asgi_matomo._visitor import VisitorIds

if TYPE_CHECKING:
    import re

    import httpx

    from asgi_matomo._sender import Stats

logger = logging.getLogger("asgi_matomo")

# nginx's convention for "the client went away before we answered".
CLIENT_CLOSED_REQUEST = 499
# After any of these from the app, the server may exit: the sender flushes first.
_LAST_LIFESPAN_MESSAGES = frozenset(
    {"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"}
)


class MatomoMiddleware:
    """Report every request the wrapped ASGI app serves to Matomo.

    Hits are built on the request path and delivered by a background sender in
    batches through Matomo's bulk API; tracking never raises into the app and
    never changes a response.

    ```python
    app = Starlette(
        routes=[Route("/", homepage)],
        middleware=[
            Middleware(MatomoMiddleware, matomo_url="https://matomo.example.org", idsite=1)
        ],
    )
    ```

    Args:
        app: the ASGI app to wrap.
        matomo_url: your Matomo, with or without `/matomo.php`.
        idsite: the site the hits belong to.
        access_token: a `token_auth` with write access to the site; enables the
            visitor IP (`cip`) and hits older than 24 h. Sent in the request body only.
        assume_https: report URLs as `https://` whatever the server saw.
        client: your own `httpx.AsyncClient`; never closed by the middleware.
        http_timeout: seconds each request to Matomo may take, whole exchange, any client.
        exclude_paths: paths not tracked (exact match).
        exclude_patterns: regular expressions of paths not tracked.
        route_details: Matomo parameters per path or route template.
        allowed_methods: HTTP methods tracked, or `"all-methods"`.
        ignored_methods: HTTP methods never tracked (by default `OPTIONS`: CORS
            preflights); wins over `allowed_methods`, but for a default method
            that `allowed_methods` lists.
        ignored_user_agents: regular expressions of user agents not tracked.
        action_name_from_route: name page views after the route template.
        custom_dimensions: custom variable names to send as `dimension{ID}`.
        trusted_proxies: addresses or networks whose forwarding headers are believed;
            "unix" trusts a proxy on a unix socket (no peer address).
        forwarded_header: the header your proxies write: "x-forwarded-for" (with
            X-Forwarded-Proto/-Host) or "forwarded" (RFC 7239); the other is ignored.
        anonymize_ip_bytes: zero the last 0-3 bytes of the visitor IP.
        visitor_ids: send a pseudonymous visitor id (`cid`) with every hit, so
            that Matomo counts visits and visitors right without a token: the
            JavaScript tracker's `_pk_id` cookie id, else a keyed hash of the UTC
            day, site, visitor IP and user agent. A `uid` wins over it.
        visitor_id: a function of the request scope returning your own id for
            its visitor (hashed with the key), or None for the default id.
        visitor_key: the secret of the hash (else `ASGI_MATOMO_VISITOR_KEY`,
            else a key shared by the workers of this host); the same on every
            host of a deployment.
        request_details: a function of the request scope and response status,
            run when the response ends, returning Matomo parameters for the hit
            (e.g. `uid` from the authenticated user); the request's own
            overrides win over them.
        batch_size: the most hits in one bulk request (the sender adapts below it).
        flush_interval: seconds a hit may wait for its batch to fill.
        max_queue_size: hits kept in memory; beyond, spooled or dropped and counted.
        max_concurrent_batches: the most bulk requests in flight at once (adapted below it).
        retry_deadline: seconds a failing batch is retried.
        shutdown_timeout: seconds the shutdown may spend delivering the queue.
        spool_path: SQLite file for hits that would otherwise be lost. A file that
            cannot be used (full disk, corrupt) is logged and tried again, not raised.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        matomo_url: str,
        idsite: int,
        access_token: str | None = None,
        assume_https: bool = True,
        client: httpx.AsyncClient | None = None,
        http_timeout: float = 5,
        exclude_paths: Iterable[str] | None = None,
        exclude_patterns: Iterable[str | re.Pattern[str]] | None = None,
        route_details: Mapping[str, Mapping[str, Any]] | None = None,
        allowed_methods: Iterable[str] | Literal["all-methods"] = "all-methods",
        ignored_methods: Iterable[str] | None = DEFAULT_IGNORED_METHODS,
        ignored_user_agents: Iterable[str | re.Pattern[str]] | None = None,
        action_name_from_route: bool = False,
        custom_dimensions: Mapping[str, int] | None = None,
        trusted_proxies: Iterable[str] | None = None,
        forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
        anonymize_ip_bytes: int = 0,
        visitor_ids: bool = True,
        visitor_id: Callable[[Scope], str | int | None] | None = None,
        visitor_key: str | bytes | None = None,
        request_details: Callable[[Scope, int], Mapping[str, Any] | None] | None = None,
        batch_size: int = _sender.DEFAULT_BATCH_SIZE,
        flush_interval: float = _sender.DEFAULT_FLUSH_INTERVAL,
        max_queue_size: int = _sender.DEFAULT_MAX_QUEUE_SIZE,
        max_concurrent_batches: int = _sender.DEFAULT_MAX_CONCURRENT_BATCHES,
        retry_deadline: float = _sender.DEFAULT_RETRY_DEADLINE,
        shutdown_timeout: float = _sender.DEFAULT_SHUTDOWN_TIMEOUT,
        spool_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app: ASGIApp = app
        token = _check_token(access_token)
        self._config = build_config(
            idsite=idsite,
            track_visitor_ip=token is not None,
            assume_https=assume_https,
            exclude_paths=exclude_paths,
            exclude_patterns=exclude_patterns,
            allowed_methods=allowed_methods,
            ignored_methods=ignored_methods,
            ignored_user_agents=ignored_user_agents,
            route_details=route_details,
            action_name_from_route=action_name_from_route,
            custom_dimensions=custom_dimensions,
            trusted_proxies=trusted_proxies,
            anonymize_ip_bytes=anonymize_ip_bytes,
            forwarded_header=forwarded_header,
            visitor_ids=visitor_ids,
            visitor_key=visitor_key,
        )
        self._visitor_id = function(
            "visitor_id", visitor_id, " (to send no visitor id: visitor_ids=False)"
        )
        self._request_details = function("request_details", request_details)
        self._failed: set[str] = set()
        if client is not None and not callable(getattr(client, "post", None)):
            raise TypeError("client must be an httpx.AsyncClient (or have its async post method)")
        self._sender_options: dict[str, Any] = {
            "endpoint": tracking_endpoint(matomo_url),
            "access_token": token,
            "client": client,
            "http_timeout": positive_number("http_timeout", http_timeout),
            "batch_size": positive_int("batch_size", batch_size),
            "flush_interval": positive_number("flush_interval", flush_interval),
            "max_queue_size": positive_int("max_queue_size", max_queue_size),
            "max_concurrent_batches": positive_int(
                "max_concurrent_batches", max_concurrent_batches
            ),
            "retry_deadline": positive_number("retry_deadline", retry_deadline),
            "shutdown_timeout": positive_number("shutdown_timeout", shutdown_timeout),
        }
        self._spool_path = spool_path
        self._lifespans = 0
        self._sender = self._new_sender()

    def _new_sender(self) -> _sender.BatchSender:
        # The spool is opened here, at start-up: a wrong spool_path is a clear
        # error before the first request, and a file problem (full disk, corrupt
        # file) is logged at once; it never stops the app (see _spool_guard).
        spool = _open_spool(self._spool_path)
        return _sender.BatchSender(**self._sender_options, spool=spool)

    @property
    def stats(self) -> Stats:
        """A snapshot of the delivery counters (queued, sent, retried, dropped, ...)."""
        return self._sender.stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope.get("type")
        if scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope_type != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.time()
        start = time.perf_counter()
        try:
            # Tracked or not: a handler cannot know, and may write to it either way.
            state = fresh_state(scope)
            info = inspect_request(self._config, scope, started_at)
        except Exception:  # tracking must never break a request
            logger.debug("asgi_matomo: could not inspect a request", exc_info=True)
            info = None
            state = scope.get("state") if isinstance(scope.get("state"), dict) else None
        # For set_tracking_params: reset on the way out, whichever way that is.
        token = current_state.set(state)
        if info is None:
            try:
                await self.app(scope, receive, send)
            finally:
                current_state.reset(token)
            return

        status: int | None = None
        finished: float | None = None
        disconnected = False

        async def receive_and_watch() -> Message:
            nonlocal disconnected
            message = await receive()
            if message.get("type") == "http.disconnect":
                disconnected = True
            return message

        def send_and_watch(message: Message) -> Awaitable[None]:
            # A plain function returning the server's own awaitable: no coroutine
            # of ours per message. The app's answer is complete when it hands over
            # the last part, which is when the clock stops: a slow client reading
            # the body is not the server's time.
            nonlocal status, finished
            message_type = message.get("type")
            if message_type == "http.response.start":
                # An answer to a client that already left reaches nobody.
                status = CLIENT_CLOSED_REQUEST if disconnected else message.get("status")
            elif (
                message_type == "http.response.body" and not message.get("more_body", False)
            ) or message_type == "http.response.pathsend":
                finished = time.perf_counter()
            return send(message)

        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        except Exception:
            # The app's error is the server's to report; we only record the 500
            # (or 499: apps raise when the client vanished mid-upload).
            failed = CLIENT_CLOSED_REQUEST if disconnected else 500
            await self._track(scope, state, info, status or failed, start, finished)
            raise
        except BaseException:
            # Cancelled (server shutdown, or a client gone on servers that cancel):
            # queue the hit without awaiting anything, the task must stop promptly.
            # In direct mode (no lifespan) there is no queue: the sender counts
            # the hit as dropped, so the loss at least shows in the stats.
            unsent = self._submit(
                scope, state, info, status or CLIENT_CLOSED_REQUEST, start, finished
            )
            for hit in unsent:
                self._sender.submit(hit)
            raise
        finally:
            current_state.reset(token)
        if status is None:
            status = CLIENT_CLOSED_REQUEST if disconnected else 500
        # Inlined _track: the common case queues without creating a coroutine.
        unsent = self._submit(scope, state, info, status, start, finished)
        if unsent:
            await self._sender.send_now(unsent)

    def _submit(
        self,
        scope: Scope,
        state: MutableMapping[str, Any] | None,
        info: RequestInfo,
        status: int,
        start: float,
        finished: float | None,
    ) -> list[Hit]:
        """Build the request's hits and queue them; returns those no queue took."""
        elapsed_ms = ((finished or time.perf_counter()) - start) * 1000
        app_details = visitor_id = None
        if self._request_details is not None:
            app_details = self._call("request_details", self._request_details, scope, status)
            if app_details is not None and not isinstance(app_details, Mapping):
                self._failed_once(
                    "request_details",
                    "returned %s instead of a dict of Matomo parameters",
                    type(app_details).__name__,
                )
                app_details = None
        visitor = self._config.visitor
        if self._visitor_id is not None and visitor is not None:
            # Hashed inside the guard: an id that cannot be hashed is the function's fault.
            visitor_id = self._call("visitor_id", _hashed_id, visitor, self._visitor_id, scope)
        try:
            hits = build_hits(
                self._config,
                info,
                status=status,
                elapsed_ms=elapsed_ms,
                template=route_template(scope),
                overrides=read_overrides(scope, state),
                rand=_rand,
                app_details=app_details,
                visitor_id=visitor_id,
            )
        except Exception:  # tracking must never break a request
            logger.debug("asgi_matomo: could not track a request", exc_info=True)
            return []
        sender = self._sender
        if not sender.running:
            return hits
        for hit in hits:
            sender.submit(hit)
        return []

    def _call(self, name: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run a user's function; its failure costs its own result, never the hit."""
        try:
            return function(*args)
        except _NoIdError as exc:
            self._failed_once(name, "returned %s instead of a str, an int, a UUID or None", exc)
            return None
        except Exception:
            self._failed_once(name, "raised an exception", exc_info=True)
            return None

    def _failed_once(self, name: str, what: str, *args: Any, exc_info: bool = False) -> None:
        # Once per option: a function that fails, fails on every request.
        level = logging.DEBUG if name in self._failed else logging.WARNING
        self._failed.add(name)
        logger.log(
            level,
            "asgi_matomo: the %s function " + what + "; the hit is sent without its result"
            " (said once; later failures are logged at DEBUG level)",
            name,
            *args,
            exc_info=exc_info,
        )

    async def _track(
        self,
        scope: Scope,
        state: MutableMapping[str, Any] | None,
        info: RequestInfo,
        status: int,
        start: float,
        finished: float | None,
    ) -> None:
        unsent = self._submit(scope, state, info, status, start, finished)
        if unsent:
            # No lifespan ran (server started with lifespan off, TestClient
            # without `with`): nothing would flush a queue, so send now. The
            # response is already complete here, and send_now never raises.
            await self._sender.send_now(unsent)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the sender for as long as the app lives, around the app's own lifespan.

        An app that does not speak lifespan raises on this scope; per the ASGI spec
        the server then carries on without lifespan events, which would leave us
        without a place to run the sender. So we answer the events ourselves.
        """
        if self._lifespans:
            # A second lifespan on the same app object (tests do this): the first
            # one closed its sender, so start afresh.
            self._sender = self._new_sender()
        self._lifespans += 1
        sender = self._sender
        startup_received = False
        app_answered = False

        async def receive_and_watch() -> Message:
            nonlocal startup_received
            message = await receive()
            if message.get("type") == "lifespan.startup":
                startup_received = True
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal app_answered
            message_type = message.get("type", "")
            if message_type.startswith("lifespan.startup."):
                app_answered = True
            if message_type in _LAST_LIFESPAN_MESSAGES:
                # Flush before the server is told it may exit.
                await sender.aclose()
            await send(message)

        app_error: Exception | None = None
        async with sender.running_in_background():
            try:
                await self.app(scope, receive_and_watch, send_and_watch)
            except Exception as exc:
                if app_answered:
                    # Raised outside the task group below, so that the server
                    # sees the app's own exception, not an exception group.
                    app_error = exc
                elif startup_received:
                    # It took the startup event and failed on it: that is a
                    # failed startup, which the server must hear about.
                    await sender.aclose()
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    app_error = exc
                else:
                    logger.debug("asgi_matomo: the app does not support lifespan; answering it")
                    await _answer_lifespan(receive, send, sender, startup_received)
            else:
                if not app_answered:
                    await _answer_lifespan(receive, send, sender, startup_received)
        if app_error is not None:
            raise app_error


async def _answer_lifespan(
    receive: Receive, send: Send, sender: _sender.BatchSender, startup_received: bool
) -> None:
    if not startup_received:
        await receive()
    await send({"type": "lifespan.startup.complete"})
    while (await receive()).get("type") != "lifespan.shutdown":
        pass
    await sender.aclose()
    await send({"type": "lifespan.shutdown.complete"})


class _NoIdError(Exception):
    """A visitor_id result that names no visitor (its type is the message)."""


def _hashed_id(
    visitor: VisitorIds, function: Callable[[Scope], object], scope: Scope
) -> str | None:
    value = function(scope)
    if isinstance(value, uuid.UUID):  # a common primary key: its text is the id
        value = str(value)
    hashed = visitor.app_id(value)
    if hashed is None and value is not None and value != "" and value != b"":
        raise _NoIdError(type(value).__name__)
    return hashed


def _rand() -> int:
    return random.getrandbits(31)


def _open_spool(spool_path: str | os.PathLike[str] | None) -> Any:
    if spool_path is None:
        return None
    if not isinstance(spool_path, str | os.PathLike):
        raise TypeError(f"spool_path must be a path, got {spool_path!r}")
    # sqlite3 is loaded only when a spool is used.
    from asgi_matomo._spool_guard import GuardedSpool

    return GuardedSpool(spool_path)
