"""The few request headers tracking reads, decoded once and cached.

Servers hand over every header as bytes; a hit needs four of them (eight behind
a trusted proxy) as text. Pure functions: the scope's headers in, a small dict out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from asgi_matomo._encoding import CACHE_SIZE, CACHED_LENGTH
from asgi_matomo._overrides import MAX_TEXT_LENGTH
from asgi_matomo._overrides import clip_text as _clip
from asgi_matomo._types import Scope
from asgi_matomo._visitor import cookie_visitor_id

# isinstance() with a tuple: `bytes | bytearray` in a call builds a union object each time.
BYTES_TYPES = (bytes, bytearray)


def decode(value: object) -> str:
    """Header bytes as text: UTF-8 when it is, Latin-1 (which never fails) otherwise."""
    if isinstance(value, str):
        return value
    if not isinstance(value, BYTES_TYPES):
        return ""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(value).decode("latin-1")


# The decoded text of short header values: user agents, languages, referrers and
# hosts take few distinct values. A plain dict (a lookup is cheaper than a call
# through lru_cache), emptied when full so that it stays bounded.
_header_texts: dict[bytes, str] = {}


# The names are looked up in the dict `read_headers` returns by these very objects
# (`headers.get(HOST)`): a dict compares keys by identity first, and an equal
# bytes object from another module's constants costs a comparison of the bytes.
HOST, USER_AGENT, ACCEPT_LANGUAGE, REFERER = b"host", b"user-agent", b"accept-language", b"referer"
FORWARDED, X_FORWARDED_FOR = b"forwarded", b"x-forwarded-for"
X_FORWARDED_PROTO, X_FORWARDED_HOST = b"x-forwarded-proto", b"x-forwarded-host"
_WANTED_HEADERS = frozenset(
    {
        HOST,
        USER_AGENT,
        ACCEPT_LANGUAGE,
        REFERER,
        FORWARDED,
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
    }
)
WANTED_ORDER = tuple(sorted(_WANTED_HEADERS))
# Without a trusted proxy the forwarding headers are never read: half the lookups.
DIRECT_ORDER = tuple(sorted({HOST, USER_AGENT, ACCEPT_LANGUAGE, REFERER}))
# Headers a proxy chain may legitimately repeat; their values are joined in order.
_LIST_HEADERS = frozenset({FORWARDED, X_FORWARDED_FOR})
# Field lines of `Forwarded` stay apart: a quote cannot span two of them, so a line
# a proxy added is read whatever the visitor's line before it holds (see _proxy).
# Servers refuse a newline inside a header value, so it cannot come from a client.
_LINE_SEPARATORS = {FORWARDED: "\n", X_FORWARDED_FOR: ", "}
# Under this name `read_headers` returns the visitor id of the JS tracker's cookie, not
# the Cookie header: cookies are long, differ per visitor and never go into a hit,
# so they are neither decoded nor cached.
COOKIE_VISITOR = b"cookie"


def _header_value(value: object, keep_end: bool = False) -> str:
    if value.__class__ is bytes and len(value) <= CACHED_LENGTH:
        text = _header_texts.get(value)
        if text is None:
            if len(_header_texts) >= CACHE_SIZE:
                _header_texts.clear()
            text = _header_texts[value] = decode(value).strip()
        return text
    if keep_end:
        return _clip_start(decode(value).strip())
    return _clip(decode(value).strip(), MAX_TEXT_LENGTH)


def _clip_start(text: str) -> str:
    """A forwarding list clipped from the left: proxies append, so the trusted end stays.

    Kept from the left, a visitor's long header would push out what the proxies
    wrote after it, and the visitor's own entries would look like the last hops.
    """
    return text if len(text) <= MAX_TEXT_LENGTH else text[-MAX_TEXT_LENGTH:]


def read_headers(
    scope: Scope,
    wanted: tuple[bytes, ...] = WANTED_ORDER,
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
                    cookie_visitor_id(value, cookie) if isinstance(value, BYTES_TYPES) else None
                )
                if visitor is not None:
                    found[COOKIE_VISITOR] = visitor
            return found
    return read_headers_by_loop(raw, cookie)


def read_headers_by_loop(raw: object, cookie: re.Pattern[bytes] | None = None) -> dict[bytes, str]:
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
            if key == COOKIE_VISITOR and cookie is not None and isinstance(value, BYTES_TYPES):
                # HTTP/2 may split the cookies over several fields.
                cookies.append(bytes(value))
            continue
        text = _header_value(value, key in _LIST_HEADERS)
        if key in found:
            if key in _LIST_HEADERS:
                found[key] = _clip_start(f"{found[key]}{_LINE_SEPARATORS[key]}{text}")
            continue
        found[key] = text
    if cookie is not None and cookies:
        visitor = cookie_visitor_id(b"; ".join(cookies), cookie)
        if visitor is not None:
            found[COOKIE_VISITOR] = visitor
    return found
