"""What a hit needs from the request, read from the ASGI scope when it starts.

Method, paths, URL, the few headers, and the visitor's address (behind trusted
proxies only). Also the options every later step reads (`TrackingConfig`).
Pure: the scope and the time in, a `RequestInfo` (or None: not tracked) out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote

from asgi_matomo._headers import (
    ACCEPT_LANGUAGE,
    COOKIE_VISITOR,
    DIRECT_ORDER,
    FORWARDED,
    HOST,
    REFERER,
    USER_AGENT,
    WANTED_ORDER,
    X_FORWARDED_FOR,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    decode,
    read_headers,
)
from asgi_matomo._overrides import MAX_URL_LENGTH
from asgi_matomo._overrides import clip_url as _clip_url
from asgi_matomo._proxy import (
    IPNetwork,
    anonymize_ip,
    hint_untrusted_peer,
    is_trusted,
    parse_ip,
    plain_peer,
    resolve_forwarded,
)
from asgi_matomo._types import Scope
from asgi_matomo._visitor import VisitorIds

_HOST_PATTERN = re.compile(r"^[A-Za-z0-9.\-_]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Characters that may stay unescaped in a URL path (RFC 3986 `pchar` and `/`).
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """The middleware's options, validated and precomputed once."""

    idsite: int
    assume_https: bool = True
    track_visitor_ip: bool = False
    exclude_paths: frozenset[str] = frozenset()
    exclude_patterns: tuple[re.Pattern[str], ...] = ()
    allowed_methods: frozenset[str] | None = None
    ignored_methods: frozenset[str] = frozenset()
    ignored_user_agents: tuple[re.Pattern[str], ...] = ()
    route_details: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    action_name_from_route: bool = False
    custom_dimensions: Mapping[str, int] = field(default_factory=dict)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    trust_unix_socket: bool = False
    forwarded_header: str = "x-forwarded-for"
    anonymize_ip_bytes: int = 0
    # None: no visitor id (`cid`) on the hits.
    visitor: VisitorIds | None = None


class RequestInfo(NamedTuple):
    """What the hit needs from the request, captured when the request starts.

    A named tuple rather than a frozen dataclass: one is made per request, and
    a frozen dataclass sets each field through `object.__setattr__`.
    """

    method: str
    path: str
    app_path: str
    url: str
    user_agent: str | None
    language: str | None
    referrer: str | None
    visitor_ip: str | None
    started_at: float
    # From the JS tracker's cookie, else the day's keyed hash; None when switched off.
    visitor_id: str | None = None


_SEQUENCE_TYPES = (list, tuple)
# The methods servers send, as they send them: no new uppercase string per request.
_UPPER_METHODS = {method: method for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")}

# Forwarding headers from a peer outside `trusted_proxies` are said once
# (`hint_untrusted_peer`). Without a trusted proxy they are not otherwise read:
# one request a second at most is looked at for them (two more header lookups),
# until the first that has them (then never again, whatever it said).
WATCH_INTERVAL = 1.0
_next_watch = 0.0


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _paths(scope: Scope) -> tuple[str, str, str]:
    """(full decoded path, path below root_path, full path as sent on the wire).

    Servers disagree on whether `path` already holds `root_path` (uvicorn: yes,
    hypercorn: no); either way it must appear exactly once.
    """
    root = scope.get("root_path")
    path = scope.get("path")
    raw = scope.get("raw_path")
    if not root and path.__class__ is str and path and raw.__class__ is bytes and raw:
        # The common case, no root path: what the general code below comes to.
        wire = raw.decode("latin-1")
        return path, path, wire if "?" not in wire else wire.split("?", 1)[0]
    return _paths_general(root, path, raw)


def _paths_general(root: object, path: object, raw: object) -> tuple[str, str, str]:
    root = root if isinstance(root, str) else ""
    path = path if isinstance(path, str) and path else "/"
    full = path if not root or _within(path, root) else root + path
    app_path = full[len(root) :] if root and _within(full, root) else full
    app_path = app_path or "/"

    if isinstance(raw, bytes | bytearray) and raw:
        # raw_path is what the client sent, escapes included; never re-quote it.
        wire = bytes(raw).decode("latin-1").split("?", 1)[0]
        if root and not _within(wire, quote(root, safe=_PATH_SAFE)):
            wire = quote(root, safe=_PATH_SAFE) + wire
    else:
        wire = quote(full, safe=_PATH_SAFE)
    return full, app_path, wire


def _server_host(scope: Scope) -> str | None:
    server = scope.get("server")
    if not isinstance(server, list | tuple) or len(server) != 2:
        return None
    host, port = server
    if not isinstance(host, str) or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port in (80, 443):
        return host
    return f"{host}:{port}"


@lru_cache(maxsize=256)
def _valid_host(value: str | None) -> str | None:
    if value and _HOST_PATTERN.match(value):
        return value.lower()
    return None


def _method_allowed(config: TrackingConfig, method: str) -> bool:
    if method in config.ignored_methods:
        return False
    return config.allowed_methods is None or method in config.allowed_methods


def _path_excluded(config: TrackingConfig, full: str, app_path: str) -> bool:
    if full in config.exclude_paths or app_path in config.exclude_paths:
        return True
    return bool(config.exclude_patterns) and any(
        pattern.search(full) or pattern.search(app_path) for pattern in config.exclude_patterns
    )


def _watch(
    config: TrackingConfig, peer: str | None, headers: dict[bytes, str], started_at: float
) -> None:
    """A request from a peer outside `trusted_proxies`, looked at for forwarding headers."""
    global _next_watch
    if X_FORWARDED_FOR not in headers and FORWARDED not in headers:
        _next_watch = started_at + WATCH_INTERVAL
        return
    _next_watch = math.inf
    hint_untrusted_peer(
        peer, headers.get(X_FORWARDED_FOR), headers.get(FORWARDED), config.forwarded_header
    )


def inspect_request(config: TrackingConfig, scope: Scope, started_at: float) -> RequestInfo | None:
    """Capture what the hit needs at request start; None when the request is not tracked."""
    if scope.get("type") != "http":
        return None
    method = scope.get("method")
    upper = _UPPER_METHODS.get(method) if method.__class__ is str else None
    method = upper or (method.upper() if isinstance(method, str) and method else "GET")
    if (config.allowed_methods is not None or config.ignored_methods) and not _method_allowed(
        config, method
    ):
        return None
    full, app_path, wire = _paths(scope)
    if (config.exclude_paths or config.exclude_patterns) and _path_excluded(config, full, app_path):
        return None
    proxied = config.trusted_proxies or config.trust_unix_socket
    watch = started_at >= _next_watch
    visitor = config.visitor
    headers = read_headers(
        scope,
        WANTED_ORDER if proxied or watch else DIRECT_ORDER,
        visitor.cookie if visitor is not None else None,
    )
    user_agent = headers.get(USER_AGENT) or None
    if (
        user_agent
        and config.ignored_user_agents
        and any(p.search(user_agent) for p in config.ignored_user_agents)
    ):
        return None

    client = scope.get("client")
    peer = client[0] if isinstance(client, _SEQUENCE_TYPES) and client else None
    peer = peer if isinstance(peer, str) and peer else None
    if peer is not None and ":" in peer:
        # IPv6, or IPv4 as a dual-stack socket gives it (`::ffff:192.0.2.1`): unmapped,
        # so that trusted_proxies, `cip` and the visitor id see one address.
        peer = plain_peer(peer)
    visitor_ip = peer
    forwarded_proto = forwarded_host = None
    if (peer is None and config.trust_unix_socket) or (
        config.trusted_proxies and is_trusted(parse_ip(peer or ""), config.trusted_proxies)
    ):
        # Only the header family the proxy writes: the other one reaches us as the
        # visitor sent it, and would let anyone pick the address Matomo records.
        if config.forwarded_header == "forwarded":
            forwarded = resolve_forwarded(
                forwarded=headers.get(FORWARDED) or "",
                x_forwarded_for=None,
                x_forwarded_proto=None,
                x_forwarded_host=None,
                networks=config.trusted_proxies,
            )
        else:
            forwarded = resolve_forwarded(
                forwarded=None,
                x_forwarded_for=headers.get(X_FORWARDED_FOR),
                x_forwarded_proto=headers.get(X_FORWARDED_PROTO),
                x_forwarded_host=headers.get(X_FORWARDED_HOST),
                networks=config.trusted_proxies,
            )
        visitor_ip = forwarded.client or peer
        forwarded_proto, forwarded_host = forwarded.proto, forwarded.host
    elif watch:
        _watch(config, peer, headers, started_at)

    if config.assume_https:
        scheme = "https"
    elif forwarded_proto in ("http", "https"):
        scheme = forwarded_proto
    else:
        scope_scheme = scope.get("scheme")
        scheme = "https" if scope_scheme in ("https", "wss") else "http"
    host = (
        (forwarded_host is not None and _valid_host(forwarded_host))
        or _valid_host(headers.get(HOST))
        or _server_host(scope)
        or "localhost"
    )
    query = scope.get("query_string")
    url = f"{scheme}://{host}{wire}"
    if query:
        query_text = decode(query)
        if query_text:
            url += "?" + query_text

    visitor_id = None
    if visitor is not None:
        visitor_id = headers.get(COOKIE_VISITOR)
        if visitor_id is None:
            # The cache hit of `daily_id` inlined: this runs for every request.
            if visitor.since <= started_at < visitor.until:
                visitor_id = visitor.ids.get((visitor_ip, user_agent))
            if visitor_id is None:
                # The full address, before any masking: it only enters the keyed hash.
                visitor_id = visitor.daily_id(visitor_ip, user_agent, started_at)
    if visitor_ip is not None and config.anonymize_ip_bytes:
        visitor_ip = anonymize_ip(visitor_ip, config.anonymize_ip_bytes)
    # Positional: a named tuple is made faster that way (method, path, app_path,
    # url, user_agent, language, referrer, visitor_ip, started_at, visitor_id).
    return RequestInfo(
        method,
        full,
        app_path,
        url if len(url) <= MAX_URL_LENGTH else _clip_url(url, MAX_URL_LENGTH),
        user_agent,
        headers.get(ACCEPT_LANGUAGE) or None,
        headers.get(REFERER) or None,
        visitor_ip if config.track_visitor_ip else None,
        started_at,
        visitor_id,
    )
