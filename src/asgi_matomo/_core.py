"""The sans-IO heart: one ASGI request in, the exact Matomo tracking parameters out.

Nothing here touches the network, the clock or the event loop: the middleware
passes in times and the response status, and gets `Hit`s back. That is what makes
every parameter testable as a plain function call.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote

from asgi_matomo._hit import Hit

# Matomo's limits, cleaning and clipping live with the overrides; re-exported
# here, where the rest of the request is cleaned with them.
from asgi_matomo._overrides import CUSTOM_VARIABLE_SLOTS as CUSTOM_VARIABLE_SLOTS
from asgi_matomo._overrides import MAX_ACTION_NAME_LENGTH as MAX_ACTION_NAME_LENGTH
from asgi_matomo._overrides import MAX_CUSTOM_VARIABLE_LENGTH as MAX_CUSTOM_VARIABLE_LENGTH
from asgi_matomo._overrides import MAX_DIMENSION_LENGTH as MAX_DIMENSION_LENGTH
from asgi_matomo._overrides import MAX_TEXT_LENGTH as MAX_TEXT_LENGTH
from asgi_matomo._overrides import MAX_URL_LENGTH as MAX_URL_LENGTH
from asgi_matomo._overrides import clip_text as _clip
from asgi_matomo._overrides import clip_url as _clip_url
from asgi_matomo._overrides import merge_overrides as _merge_overrides
from asgi_matomo._overrides import performance_value as performance_value
from asgi_matomo._overrides import timestamp as _timestamp
from asgi_matomo._overrides import warn_once as _warn_once
from asgi_matomo._proxy import (
    IPNetwork,
    anonymize_ip,
    is_trusted,
    parse_ip,
    resolve_forwarded,
)
from asgi_matomo._types import Scope
from asgi_matomo._visitor import VisitorIds, cookie_visitor_id, valid_cid

logger = logging.getLogger("asgi_matomo")

# The two custom variables every hit carries, in this slot order.
STATUS_VARIABLE = "http_status_code"
METHOD_VARIABLE = "http_method"
DEFAULT_VARIABLES = (STATUS_VARIABLE, METHOD_VARIABLE)

STATE_KEY = "asgi_matomo"
NOT_FOUND = 404
NOT_FOUND_ACTION_NAME = "(not found)"
EVENT_KEYS = ("e_c", "e_a", "e_n", "e_v")
# Parameters that describe the page view only. An event hit must not repeat them:
# `new_visit` twice would start two visits, a second `urlref` could re-attribute it.
PAGE_ONLY_KEYS = frozenset({"action_name", "cvar", "new_visit", "urlref", "search", "search_cat"})

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


# isinstance() with a tuple: `bytes | bytearray` in a call builds a union object each time.
_BYTES_TYPES = (bytes, bytearray)
_SEQUENCE_TYPES = (list, tuple)


def _decode(value: object) -> str:
    """Header bytes as text: UTF-8 when it is, Latin-1 (which never fails) otherwise."""
    if isinstance(value, str):
        return value
    if not isinstance(value, _BYTES_TYPES):
        return ""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(value).decode("latin-1")


# Percent-encoding is the bulk of a hit's cost. urllib's quote() calls a Python
# function per byte; this table is applied by map() in C, and the values that
# repeat from request to request (user agents, languages, referrers, action
# names, custom variables) are remembered, within a bounded cache.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_PERCENT = [chr(byte) if byte in _UNRESERVED else f"%{byte:02X}" for byte in range(256)]
_QUOTE_CACHE_SIZE = 1024


# Longer values (URLs with their query) rarely repeat: they bypass the cache, which
# keeps it small (at most about a megabyte).
_CACHED_LENGTH = 256


def _quote(value: str) -> str:
    return "".join(map(_PERCENT.__getitem__, value.encode("utf-8", "surrogatepass")))


_quote_cached = lru_cache(maxsize=_QUOTE_CACHE_SIZE)(_quote)


def quote_value(value: str) -> str:
    """`urllib.parse.quote(value, safe="")`, several times faster."""
    return _quote_cached(value) if len(value) <= _CACHED_LENGTH else _quote(value)


def encode_query(params: Mapping[str, str]) -> str:
    """`urlencode(params, quote_via=quote)` with the fast, cached quoting above."""
    # quote_value inlined: this runs for every parameter of every hit.
    cached, limit = _quote_cached, _CACHED_LENGTH
    return "&".join(
        [
            f"{cached(key)}={cached(value) if len(value) <= limit else _quote(value)}"
            for key, value in params.items()
        ]
    )


# The decoded text of short header values: user agents, languages, referrers and
# hosts take few distinct values. A plain dict (a lookup is cheaper than a call
# through lru_cache), emptied when full so that it stays bounded.
_header_texts: dict[bytes, str] = {}


_WANTED_HEADERS = frozenset(
    {
        b"host",
        b"user-agent",
        b"accept-language",
        b"referer",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
_WANTED_ORDER = tuple(sorted(_WANTED_HEADERS))
# Without a trusted proxy the forwarding headers are never read: half the lookups.
_DIRECT_ORDER = tuple(sorted({b"host", b"user-agent", b"accept-language", b"referer"}))
# Headers a proxy chain may legitimately repeat; their values are joined in order.
_LIST_HEADERS = frozenset({b"forwarded", b"x-forwarded-for"})
# Under this name `_headers` returns the visitor id of the JS tracker's cookie, not
# the Cookie header: cookies are long, differ per visitor and never go into a hit,
# so they are neither decoded nor cached.
COOKIE_VISITOR = b"cookie"


def _header_value(value: object, keep_end: bool = False) -> str:
    if value.__class__ is bytes and len(value) <= _CACHED_LENGTH:
        text = _header_texts.get(value)
        if text is None:
            if len(_header_texts) >= _QUOTE_CACHE_SIZE:
                _header_texts.clear()
            text = _header_texts[value] = _decode(value).strip()
        return text
    if keep_end:
        return _clip_start(_decode(value).strip())
    return _clip(_decode(value).strip(), MAX_TEXT_LENGTH)


def _clip_start(text: str) -> str:
    """A forwarding list clipped from the left: proxies append, so the trusted end stays.

    Kept from the left, a visitor's long header would push out what the proxies
    wrote after it, and the visitor's own entries would look like the last hops.
    """
    return text if len(text) <= MAX_TEXT_LENGTH else text[-MAX_TEXT_LENGTH:]


def _headers(
    scope: Scope,
    wanted: tuple[bytes, ...] = _WANTED_ORDER,
    cookie: re.Pattern[bytes] | None = None,
) -> dict[bytes, str]:
    """The few headers tracking reads, decoded; the first occurrence wins except for lists.

    With a `cookie` pattern, also the visitor id it finds in the Cookie header(s).
    """
    raw = scope.get("headers")
    if raw.__class__ is list or raw.__class__ is tuple:
        # What servers send: lowercase byte names (the ASGI spec), each once. A
        # dict built in C then answers the few lookups; anything else (repeated
        # or mixed-case names, str names) takes the careful loop below.
        try:
            table = dict(raw)
            plain = len(table) == len(raw) and b"".join(table).islower()
        except (TypeError, ValueError):
            plain = False
        if plain:
            found: dict[bytes, str] = {}
            texts = _header_texts
            for key in wanted:
                value = table.get(key)
                if value is not None:
                    # A cache hit inline; the call only for a new or unusual value.
                    text = texts.get(value) if value.__class__ is bytes else None
                    found[key] = (
                        text if text is not None else _header_value(value, key in _LIST_HEADERS)
                    )
            if cookie is not None:
                value = table.get(COOKIE_VISITOR)
                visitor = (
                    cookie_visitor_id(value, cookie) if isinstance(value, _BYTES_TYPES) else None
                )
                if visitor is not None:
                    found[COOKIE_VISITOR] = visitor
            return found
    return _headers_by_loop(raw, cookie)


def _headers_by_loop(raw: object, cookie: re.Pattern[bytes] | None = None) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    if not isinstance(raw, Iterable):
        return found
    cookies: list[bytes] = []
    for item in raw:
        try:
            name, value = item
        except (TypeError, ValueError):
            continue
        if isinstance(name, str):
            name = name.encode("latin-1", "replace")
        if not isinstance(name, bytes | bytearray):
            continue
        key = bytes(name).lower()
        if key not in _WANTED_HEADERS:
            if key == COOKIE_VISITOR and cookie is not None and isinstance(value, _BYTES_TYPES):
                # HTTP/2 may split the cookies over several fields.
                cookies.append(bytes(value))
            continue
        text = _header_value(value, key in _LIST_HEADERS)
        if key in found:
            if key in _LIST_HEADERS:
                found[key] = _clip_start(f"{found[key]}, {text}")
            continue
        found[key] = text
    if cookie is not None and cookies:
        visitor = cookie_visitor_id(b"; ".join(cookies), cookie)
        if visitor is not None:
            found[COOKIE_VISITOR] = visitor
    return found


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


def inspect_request(config: TrackingConfig, scope: Scope, started_at: float) -> RequestInfo | None:
    """Capture what the hit needs at request start; None when the request is not tracked."""
    if scope.get("type") != "http":
        return None
    method = scope.get("method")
    method = method.upper() if isinstance(method, str) and method else "GET"
    if (config.allowed_methods is not None or config.ignored_methods) and not _method_allowed(
        config, method
    ):
        return None
    full, app_path, wire = _paths(scope)
    if (config.exclude_paths or config.exclude_patterns) and _path_excluded(config, full, app_path):
        return None
    proxied = config.trusted_proxies or config.trust_unix_socket
    visitor = config.visitor
    headers = _headers(
        scope,
        _WANTED_ORDER if proxied else _DIRECT_ORDER,
        visitor.cookie if visitor is not None else None,
    )
    user_agent = headers.get(b"user-agent") or None
    if (
        user_agent
        and config.ignored_user_agents
        and any(p.search(user_agent) for p in config.ignored_user_agents)
    ):
        return None

    client = scope.get("client")
    peer = client[0] if isinstance(client, _SEQUENCE_TYPES) and client else None
    peer = peer if isinstance(peer, str) and peer else None
    visitor_ip = peer
    forwarded_proto = forwarded_host = None
    if (peer is None and config.trust_unix_socket) or (
        config.trusted_proxies and is_trusted(parse_ip(peer or ""), config.trusted_proxies)
    ):
        # Only the header family the proxy writes: the other one reaches us as the
        # visitor sent it, and would let anyone pick the address Matomo records.
        if config.forwarded_header == "forwarded":
            forwarded = resolve_forwarded(
                forwarded=headers.get(b"forwarded") or "",
                x_forwarded_for=None,
                x_forwarded_proto=None,
                x_forwarded_host=None,
                networks=config.trusted_proxies,
            )
        else:
            forwarded = resolve_forwarded(
                forwarded=None,
                x_forwarded_for=headers.get(b"x-forwarded-for"),
                x_forwarded_proto=headers.get(b"x-forwarded-proto"),
                x_forwarded_host=headers.get(b"x-forwarded-host"),
                networks=config.trusted_proxies,
            )
        visitor_ip = forwarded.client or peer
        forwarded_proto, forwarded_host = forwarded.proto, forwarded.host

    if config.assume_https:
        scheme = "https"
    elif forwarded_proto in ("http", "https"):
        scheme = forwarded_proto
    else:
        scope_scheme = scope.get("scheme")
        scheme = "https" if scope_scheme in ("https", "wss") else "http"
    host = (
        (forwarded_host is not None and _valid_host(forwarded_host))
        or _valid_host(headers.get(b"host"))
        or _server_host(scope)
        or "localhost"
    )
    query = scope.get("query_string")
    url = f"{scheme}://{host}{wire}"
    if query:
        query_text = _decode(query)
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
        headers.get(b"accept-language") or None,
        headers.get(b"referer") or None,
        visitor_ip if config.track_visitor_ip else None,
        started_at,
        visitor_id,
    )


# Whether a route class declares sub-routes (Starlette's Mount: a property), asked
# once per class: hasattr() on a missing attribute raises and catches inside.
_mount_types: dict[type, bool] = {}


def _is_mount(route: object) -> bool:
    kind = type(route)
    declared = _mount_types.get(kind)
    if declared is None:
        declared = hasattr(kind, "routes")
        if len(_mount_types) < _QUOTE_CACHE_SIZE:
            _mount_types[kind] = declared
    if declared:
        return True
    # Or set on the object itself.
    attributes = getattr(route, "__dict__", None)
    return attributes is not None and "routes" in attributes


def route_template(scope: Scope) -> str | None:
    """The matched route's template (`/users/{id}`) where the framework exposes it.

    Read by duck typing, so that no framework is imported at runtime:

    - Starlette and FastAPI leave the innermost matched route in `scope["route"]`
      and the mount prefixes in `root_path`. A `Mount` itself is not a template.
    - Litestar writes the matched template to `scope["path_template"]`.
    - Django and Quart put nothing in the scope; `asgi_matomo.contrib` stores
      `request.resolver_match` (Django) or the template string itself (Quart's
      `request.url_rule.rule`) in `scope["route"]`. Django's routes are relative
      (`users/<int:pk>/`) and its regex routes (`^...`) are no template to show.

    Templates are relative to the app, so `root_path` is put in front.
    """
    route = scope.get("route")
    path: object = None
    if isinstance(route, str):
        path = route
    elif route is not None and not _is_mount(route):
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        if path is None:
            # Django's ResolverMatch: `route` is the matched pattern without the slash.
            django_route = getattr(route, "route", None)
            if isinstance(django_route, str) and not django_route.startswith("^"):
                path = "/" + django_route.removeprefix("/")
    if path is None:
        path = scope.get("path_template")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    root = scope.get("root_path")
    return (root if isinstance(root, str) else "") + path


def _custom_variables(
    config: TrackingConfig, custom: Mapping[str, str], params: dict[str, str]
) -> str | None:
    """Matomo's slot format `{"1":["name","value"],...}`; mapped names go to dimensions."""
    if len(custom) == len(DEFAULT_VARIABLES) and not config.custom_dimensions:
        # Only the default variables: the same few strings every time.
        return _default_custom_variables(custom[STATUS_VARIABLE], custom[METHOD_VARIABLE])
    slots: dict[str, list[str]] = {}
    for name, value in custom.items():
        dimension = config.custom_dimensions.get(name)
        if dimension is not None:
            params[f"dimension{dimension}"] = _clip(value, MAX_DIMENSION_LENGTH)
            continue
        if len(slots) == CUSTOM_VARIABLE_SLOTS:
            _warn_once(
                f"cvar-slots:{name}",
                "asgi_matomo: custom variable %r left out: Matomo keeps %d per page view",
                name,
                CUSTOM_VARIABLE_SLOTS,
            )
            continue
        slots[str(len(slots) + 1)] = [
            _clip(name, MAX_CUSTOM_VARIABLE_LENGTH),
            _clip(value, MAX_CUSTOM_VARIABLE_LENGTH),
        ]
    if not slots:
        return None
    return json.dumps(slots, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=256)
def _default_custom_variables(status: str, method: str) -> str:
    slots = {"1": [STATUS_VARIABLE, status], "2": [METHOD_VARIABLE, method]}
    return json.dumps(slots, ensure_ascii=False, separators=(",", ":"))


def _set_visitor(
    config: TrackingConfig, info: RequestInfo, params: dict[str, str], app_id: str | None
) -> None:
    if params.get("uid"):
        # Matomo derives the visitor id from the user id; a `cid` would only compete.
        params.pop("cid", None)
        return
    if "cid" in params:
        # Matomo answers 400 to a cid that is not 16 hex: one it would refuse is hashed.
        cid = params["cid"]
        own = config.visitor.cid(cid) if config.visitor is not None else valid_cid(cid)
        if own is None:
            del params["cid"]
        else:
            params["cid"] = own
        return
    visitor_id = app_id or info.visitor_id
    if visitor_id:
        params["cid"] = visitor_id


# `{id:int}` and `{id}` name the same parameter: frameworks show templates with or
# without their converters (Starlette's `path` vs `path_format`, Litestar, Quart).
_CONVERTER = re.compile(r"\{([^{}:]+):[^{}]*\}")


def template_key(template: str) -> str:
    """A route template without parameter converters, for matching `route_details`."""
    return _CONVERTER.sub(r"{\1}", template) if ":" in template else template


def lookup_route_details(
    config: TrackingConfig, info: RequestInfo, template: str | None
) -> Mapping[str, Any] | None:
    """Route details by template first, then by path (with and without root_path)."""
    details = config.route_details
    if not details:
        return None
    below_root = None
    if template is not None and info.path != info.app_path:
        # Templates can be written with or without the mount/root prefix too.
        prefix = info.path[: len(info.path) - len(info.app_path)]
        below_root = template[len(prefix) :] if template.startswith(prefix) else None
    if template is not None:
        template = template_key(template)
        below_root = template_key(below_root) if below_root is not None else None
    for key in (template, below_root, info.path, info.app_path):
        if key is not None and key in details:
            return details[key]
    return None


def _action_name(
    config: TrackingConfig, info: RequestInfo, status: int, template: str | None
) -> str:
    if template is None and status == NOT_FOUND:
        # Scanners probe thousands of made-up paths: one name for all of them
        # keeps Matomo's page-title report readable. The URL still has the path.
        return NOT_FOUND_ACTION_NAME
    if config.action_name_from_route and template is not None:
        return template
    return info.path


@lru_cache(maxsize=64)
def _query_head(idsite: int) -> str:
    return f"idsite={idsite}&rec=1&apiv=1&rand="


@lru_cache(maxsize=_QUOTE_CACHE_SIZE)
def _visitor_query(user_agent: str | None, language: str | None, referrer: str | None) -> str:
    """`&ua=..&lang=..&urlref=..`: the same few combinations come again and again."""
    query = ""
    if user_agent:
        query += "&ua=" + quote_value(user_agent)
    if language:
        query += "&lang=" + quote_value(language)
    if referrer:
        query += "&urlref=" + quote_value(referrer)
    return query


@lru_cache(maxsize=256)
def _default_cvar_query(status: str, method: str) -> str:
    return "&cvar=" + quote_value(_default_custom_variables(status, method))


def _plain_hit(
    config: TrackingConfig,
    info: RequestInfo,
    status: int,
    elapsed_ms: float | None,
    template: str | None,
    rand: Callable[[], int],
    visitor_id: str | None,
) -> Hit:
    """`build_hits` without overrides: the same query, written straight as a string.

    The parameters and their order are those of the general path below
    (tests/test_property.py checks that both give the same hit).
    """
    action_name = _clip(_action_name(config, info, status, template), MAX_ACTION_NAME_LENGTH)
    query = (
        f"{_query_head(config.idsite)}{rand()}&url={quote_value(info.url)}"
        f"&action_name={quote_value(action_name)}"
        f"{_visitor_query(info.user_agent, info.language, info.referrer)}"
    )
    if elapsed_ms is not None:
        pf_srv = performance_value(elapsed_ms)
        if pf_srv is not None:
            query += "&pf_srv=" + pf_srv
    query += _default_cvar_query(str(status), info.method)
    visitor_id = visitor_id or info.visitor_id
    if visitor_id:
        query += "&cid=" + visitor_id
    cip = info.visitor_ip if config.track_visitor_ip else None
    return Hit(query, info.started_at, cip or None)


def build_hits(
    config: TrackingConfig,
    info: RequestInfo,
    *,
    status: int,
    elapsed_ms: float | None,
    template: str | None,
    overrides: Mapping[Any, Any] | None,
    rand: Callable[[], int],
    app_details: Mapping[Any, Any] | None = None,
    visitor_id: str | None = None,
) -> list[Hit]:
    """The Matomo hits for one finished request: a page view, and an event if asked for.

    Matomo stores a hit that carries an event as an event only, dropping its page
    title and `pf_srv` (MATOMO.md), so an event travels as a second hit (`ca=1`).
    Parameters are layered: route details, then the app's (`app_details`, from
    the `request_details` option), then the request's own `overrides`. The
    visitor is, in order: a `uid` (then no `cid`: Matomo derives the visitor from
    it), a `cid` override, the app's `visitor_id` (already hashed), the request's.
    """
    details = lookup_route_details(config, info, template) if config.route_details else None
    if not details and not overrides and not app_details and not config.custom_dimensions:
        # What nearly every request is: no parameter to merge or remove.
        return [_plain_hit(config, info, status, elapsed_ms, template, rand, visitor_id)]
    action_name = _action_name(config, info, status, template)
    params: dict[str, str] = {
        "idsite": str(config.idsite),
        "rec": "1",
        "apiv": "1",
        "rand": str(rand()),
        "url": info.url,
        "action_name": action_name,
    }
    if info.user_agent:
        params["ua"] = info.user_agent
    if info.language:
        params["lang"] = info.language
    if info.referrer:
        params["urlref"] = info.referrer
    if elapsed_ms is not None:
        pf_srv = performance_value(elapsed_ms)
        if pf_srv is not None:
            params["pf_srv"] = pf_srv
    custom: dict[str, str] = {STATUS_VARIABLE: str(status), METHOD_VARIABLE: info.method}
    hit_fields: dict[str, Any] = {}
    if details:
        _merge_overrides(params, custom, details, hit_fields)
    if app_details:
        _merge_overrides(params, custom, app_details, hit_fields)
    if overrides:
        _merge_overrides(params, custom, overrides, hit_fields)
    # Overrides may lengthen or remove these; Matomo keeps 1024 characters of each.
    if "action_name" in params:
        params["action_name"] = _clip(params["action_name"], MAX_ACTION_NAME_LENGTH)
    if "url" in params:
        params["url"] = _clip_url(params["url"], MAX_URL_LENGTH)
    cvar = _custom_variables(config, custom, params)
    if cvar is not None:
        params["cvar"] = cvar
    _set_visitor(config, info, params, visitor_id)

    timestamp = _timestamp(hit_fields.get("cdt"), info.started_at)
    cip_value = hit_fields.get("cip", info.visitor_ip)
    cip = str(cip_value) if cip_value and config.track_visitor_ip else None
    if cip is not None and config.anonymize_ip_bytes and "cip" in hit_fields:
        # An address the handler supplied gets the same privacy masking.
        cip = anonymize_ip(cip, config.anonymize_ip_bytes)

    event = {key: params.pop(key) for key in EVENT_KEYS if key in params}
    hits = [Hit(encode_query(params), timestamp, cip)]
    if event.get("e_c"):
        if not event.get("e_a"):
            # Matomo answers 400 to an event with a category and no action.
            _warn_once(
                f"event-no-action:{event['e_c']}",
                "asgi_matomo: event category %r has no action (e_a): Matomo rejects such "
                "events, so only the page view is sent",
                event["e_c"],
            )
        else:
            event_params = {
                key: value
                for key, value in params.items()
                if key not in PAGE_ONLY_KEYS and not key.startswith("pf_")
            }
            event_params["rand"] = str(rand())
            event_params.update(event)
            event_params["ca"] = "1"
            hits.append(Hit(encode_query(event_params), timestamp, cip))
    return hits
