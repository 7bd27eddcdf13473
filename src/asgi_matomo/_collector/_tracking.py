"""The collector's tracking endpoint: single, bulk and queued requests, and faults.

Matomo's rules for one hit live in `_rules`; this module answers whole requests
the way Matomo does (MATOMO.md), with or without the QueuedTracking plugin, and
misbehaves on purpose when a test asked for a fault.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from asgi_matomo._collector._model import ReceivedRequest
from asgi_matomo._collector._rules import (
    BLOCKED_MESSAGE,
    EMPTY_REQUEST_TEXT,
    ERROR_TEXT,
    GIF,
    InvalidHitError,
    blocked_message,
    bulk_element,
    is_bulk,
    is_recording,
    query_params,
    shape,
)
from asgi_matomo._collector._wire import Answer, Handler, json_answer, peer_gone

if TYPE_CHECKING:
    from asgi_matomo._collector._server import Collector

__all__ = ["Auth", "Fault", "tracking"]


@dataclass
class Fault:
    """How the next tracking requests misbehave (see Collector.set_fault)."""

    status: int | None
    delay: float
    body: bytes | None
    headers: dict[str, str]
    remaining: int | None
    drop: bool


@dataclass
class Auth:
    """The token situation of one tracking request."""

    token: str | None
    blocked: bool


# What _faulted() returns when the request is to be handled normally.
_PROCEED = Answer(0)


def tracking(collector: Collector, handler: Handler, query: str, body: bytes) -> Answer | None:
    """The answer to a request at matomo.php; None: close without an answer."""
    bulk = handler.command == "POST" and is_bulk(body)
    fault = collector._take_fault()
    if fault is not None:
        answer = _faulted(collector, handler, fault, query, body, bulk=bulk)
        if answer is not _PROCEED:
            return answer
    if bulk:
        return _bulk(collector, handler, query, body)
    return _single(collector, handler, query, body)


def _faulted(
    collector: Collector, handler: Handler, fault: Fault, query: str, body: bytes, *, bulk: bool
) -> Answer | None:
    """The answer of a faulted request: None for no answer, _PROCEED to handle it."""
    elements, has_token = shape(query, body, bulk=bulk)

    def record(status: int) -> None:
        kind: Literal["single", "bulk"] = "bulk" if bulk else "single"
        collector._record(ReceivedRequest(kind, status, 0, 0, elements, has_token, faulted=True))

    if fault.delay and collector._stopping.wait(fault.delay):
        # stop() during the delay: the server went away mid-request.
        record(0)
        return None
    if fault.drop:
        record(0)
        return None
    if fault.status is None:
        if peer_gone(handler.connection):
            # The client gave up waiting (a timeout): like a request that
            # never reached Matomo, it stores nothing.
            record(0)
            return None
        return _PROCEED
    record(fault.status)
    body = (b"" if fault.status == 204 else ERROR_TEXT) if fault.body is None else fault.body
    content_type: str | None = "text/html; charset=utf-8"
    if any(name.lower() == "content-type" for name in fault.headers):
        content_type = None
    elif body.startswith((b"{", b"[")):
        content_type = "application/json"
    return Answer(fault.status, body, content_type, fault.headers)


def _single(collector: Collector, handler: Handler, query: str, body: bytes) -> Answer:
    params = query_params(query)
    content_type = handler.headers.get("Content-Type", "")
    if handler.command == "POST" and content_type.startswith("application/x-www-form-urlencoded"):
        # PHP's $_GET + $_POST: the query wins over the form.
        form = query_params(body.decode("utf-8", "replace"))
        params = {**form, **params}
    token = params.pop("token_auth", "")
    if not params and not token:
        # Matomo prints its "this is the tracking API" text; a POST without
        # any parameter is a bad request.
        status = 200 if handler.command == "GET" else 400
        if status == 400:
            collector._refusals.refused(
                "empty",
                "refused a POST without any parameter (400): send the hit as a form"
                " (application/x-www-form-urlencoded) or in the query string",
            )
        collector._record(ReceivedRequest("single", status, 0, int(status != 200), 0, False))
        return Answer(status, EMPTY_REQUEST_TEXT, "text/html; charset=utf-8")
    auth = collector._auth(handler.client_address[0], [token])
    if collector._queued and params.get("queuedtracking") != "0":
        send_image = params.get("send_image")
        return _enqueue(
            collector, handler, "single", [(0, params, auth.token)], auth, send_image, 1
        )
    tracked = invalid = 0
    try:
        if auth.blocked:
            peer = handler.client_address[0]
            raise InvalidHitError("blocked", blocked_message(peer), peer)
        # Matomo checks the site of every request, also of one that records
        # nothing: `?send_image=0` alone is a 400 (MATOMO.md, probes).
        collector._check_site(params)
        if is_recording(params):
            row = collector._validate(params, auth.token, handler, time.time())
            collector._store([row])
            tracked = 1
    except InvalidHitError as exc:
        collector._refusals.refused(exc.kind, f"refused a hit (400): {exc}", exc.reason)
        invalid = 1
    status = 400 if invalid else 204 if params.get("send_image") == "0" else 200
    collector._record(
        ReceivedRequest("single", status, tracked, invalid, 1, auth.token is not None)
    )
    if invalid:
        return Answer(400, ERROR_TEXT, "text/html; charset=utf-8")
    if status == 204:
        return Answer(204)
    return Answer(200, GIF, "image/gif")


def _bulk(collector: Collector, handler: Handler, query: str, body: bytes) -> Answer:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # nested too deep is malformed for PHP too
        data = None
    requests = data.get("requests") if isinstance(data, dict) else None
    queued = collector._queued and query_params(query).get("queuedtracking") != "0"
    if not isinstance(data, dict) or not isinstance(requests, list):
        # MATOMO.md: malformed JSON -> 200, nothing tracked, no error.
        collector._refusals.refused(
            "bulk",
            "stored nothing from a bulk request whose body is not JSON with a"
            ' "requests" list (Matomo answers success all the same): send'
            ' {"requests": ["?idsite=1&rec=1&...", ...]}',
        )
        collector._record(ReceivedRequest("bulk", 200, 0, 0, 0, False))
        if queued:
            handler.close_connection = True
            return Answer(200, GIF, "image/gif")
        return json_answer(200, {"status": "success", "tracked": 0, "invalid": 0})
    top_token = data.get("token_auth")
    top_token = top_token if isinstance(top_token, str) and top_token else None
    elements = [bulk_element(element) for element in requests]
    tokens = [top_token] if top_token else []
    tokens += [p.get("token_auth", "") for p in elements if p and p.get("token_auth")]
    auth = collector._auth(handler.client_address[0], tokens)
    has_token = bool(tokens)
    for index, params in enumerate(elements):
        if params is None:
            collector._refusals.refused(
                "element",
                f"skipped bulk element {index}: it is neither a query string"
                " ('?idsite=1&rec=1&...') nor an object (Matomo skips it silently)",
            )
    hits = [
        (index, params, params.pop("token_auth", "") or top_token)
        for index, params in enumerate(elements)
        if params is not None
    ]
    send_image = data.get("send_image")
    if queued:
        return _enqueue(collector, handler, "bulk", hits, auth, send_image, len(requests))
    if auth.blocked:
        peer = handler.client_address[0]
        collector._refusals.refused(
            "blocked", f"answered a bulk request 500: {blocked_message(peer)}", peer
        )
        collector._record(ReceivedRequest("bulk", 500, 0, 0, len(requests), has_token))
        return json_answer(500, {"status": "error", "message": BLOCKED_MESSAGE})
    now = time.time()
    rows: list[dict[str, object]] = []
    tracked = 0
    invalid_indices: list[int] = []
    for index, params, token in hits:
        try:
            collector._check_site(params)
            if not is_recording(params):
                # Matomo counts an excluded request as logged and stores nothing.
                tracked += 1
                continue
            rows.append(collector._validate(params, token, handler, now))
        except InvalidHitError as exc:
            collector._refusals.refused(
                exc.kind, f"counted bulk element {index} invalid: {exc}", exc.reason
            )
            invalid_indices.append(index)
        else:
            tracked += 1
    collector._store(rows)
    invalid = len(invalid_indices)
    status = 204 if send_image in (0, "0") else 200
    collector._record(ReceivedRequest("bulk", status, tracked, invalid, len(requests), has_token))
    if status == 204:
        return Answer(204)
    answer: dict[str, object] = {"status": "success", "tracked": tracked, "invalid": invalid}
    if collector._token_is_right(top_token):
        answer["invalid_indices"] = invalid_indices
    return json_answer(200, answer)


def _enqueue(
    collector: Collector,
    handler: Handler,
    kind: Literal["single", "bulk"],
    hits: list[tuple[int, dict[str, str], str | None]],
    auth: Auth,
    send_image: object,
    elements: int,
) -> Answer:
    """What Matomo with the QueuedTracking plugin does (MATOMO.md, QueuedTracking).

    The plugin answers before any hit is validated, closes the connection,
    and checks only the token when it queues the request: a `cip` without
    the right token refuses the whole request, valid hits too. The rest is
    validated when a worker replays the queue, which the sender never hears
    of; here the replay happens at once (the plugin set to process one
    request at a time).
    """
    handler.close_connection = True
    peer = handler.client_address[0]
    refusal: str | None = None
    reason = f"blocked {peer}"
    if auth.blocked:
        refusal = blocked_message(peer)
    elif any(
        params.get("cip") and not collector._token_is_right(token) for _, params, token in hits
    ):
        reason = "cip"
        refusal = (
            "a hit carries cip without the right token_auth, and the plugin checks"
            " it when it queues the request: give the tracker the collector's"
            " --token, or send no cip"
        )
    if refusal is not None:
        collector._refusals.refused(
            "queued", f"refused a whole {kind} request (400, nothing queued): {refusal}", reason
        )
        collector._record(
            ReceivedRequest(kind, 400, 0, len(hits), elements, auth.token is not None)
        )
        return Answer(400, GIF, "image/gif")
    now = time.time()
    rows: list[dict[str, object]] = []
    dropped = 0
    for _, params, token in hits:
        try:
            collector._check_site(params)
            if is_recording(params):
                rows.append(collector._validate(params, token, handler, now))
        except InvalidHitError as exc:
            dropped += 1
            collector._refusals.refused(
                exc.kind,
                f"dropped a queued hit, after answering success (the tracker cannot know): {exc}",
                exc.reason,
            )
    collector._store(rows)
    status = 204 if send_image in (0, "0") else 200
    record = ReceivedRequest(kind, status, len(rows), dropped, elements, auth.token is not None)
    collector._record(record)
    return Answer(204) if status == 204 else Answer(200, GIF, "image/gif")
