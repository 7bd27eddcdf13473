"""Validation of the middleware's options: every mistake is a clear error at start-up.

Each error names the option, says what was given and what is expected, so that a
typo in a settings file never turns into silently missing data in Matomo.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asgi_matomo._overrides import check_fixed
from asgi_matomo._proxy import UNIX_SOCKET, parse_trusted_proxies
from asgi_matomo._request import TrackingConfig
from asgi_matomo._routes import template_key
from asgi_matomo._visitor import VisitorIds
from asgi_matomo._visitor_key import visitor_key as _visitor_key

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
ALL_METHODS = "all-methods"
# CORS preflights: a browser sends one before many cross-origin API calls, and
# counting them as page views would double those calls' page views.
DEFAULT_IGNORED_METHODS = ("OPTIONS",)
# The header families a reverse proxy writes: X-Forwarded-For (with -Proto and
# -Host), or RFC 7239 Forwarded. Only the configured one is read.
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")
# Matomo's tracking endpoint; `/piwik.php` still works but new installs name it so.
TRACKING_ENDPOINT = "/matomo.php"


def tracking_endpoint(matomo_url: object) -> str:
    """The full tracking URL, whether `matomo_url` names the script or the Matomo root."""
    if not isinstance(matomo_url, str):
        raise TypeError(f"matomo_url must be a string, got {type(matomo_url).__name__}")
    text = matomo_url.strip()
    if not text:
        raise ValueError("matomo_url must not be empty: give your Matomo's address")
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or parts.port > 0  # .port: ValueError if out of range
    except ValueError:
        port_ok = False
    if not port_ok or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"matomo_url must be an http(s) URL such as 'https://matomo.example.org', "
            f"got {matomo_url!r}"
        )
    if "token_auth" in parts.query:
        raise ValueError(
            "matomo_url must not carry token_auth: pass it as access_token, "
            "which is sent in the request body only"
        )
    path = parts.path.rstrip("/")
    if not path.endswith(".php"):
        path += TRACKING_ENDPOINT
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    return float(value)


def access_token(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("access_token must be a string or None")
    if not value or value != value.strip() or any(c.isspace() for c in value):
        # The value itself is never echoed: it is a credential.
        raise ValueError("access_token must be a non-empty string without whitespace")
    return value


def _strings(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {value!r}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain strings, got {item!r}")
    return items


def _patterns(name: str, value: object) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of regular expressions, got {value!r}")
    compiled: list[re.Pattern[str]] = []
    for item in value:
        if isinstance(item, re.Pattern):
            compiled.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain strings or compiled patterns, got {item!r}")
        try:
            compiled.append(re.compile(item))
        except re.error as exc:
            raise ValueError(f"{name}: {item!r} is not a valid regular expression: {exc}") from exc
    return tuple(compiled)


def _methods(name: str, value: object) -> frozenset[str]:
    methods = frozenset(item.upper() for item in _strings(name, value))
    unknown = sorted(methods - HTTP_METHODS)
    if unknown:
        raise ValueError(
            f"{name}: unknown HTTP method(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(HTTP_METHODS))}"
        )
    return methods


def _allowed_methods(value: object) -> frozenset[str] | None:
    if value == ALL_METHODS or value is None:
        return None
    if isinstance(value, str):
        raise ValueError(
            f"allowed_methods must be {ALL_METHODS!r} or a list of HTTP methods, got {value!r}"
        )
    return _methods("allowed_methods", value)


def function(name: str, value: object, hint: str = "") -> Callable[..., Any] | None:
    """A user callable option: None, or a plain (not async) function."""
    if value is None:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be a function or None, got {value!r}{hint}")
    target = getattr(value, "__call__", value)  # noqa: B004 - an object with an async __call__
    if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(target):
        raise TypeError(
            f"{name} must be a plain function: it runs when the response ends, "
            f"where nothing is awaited; got the async {value!r}"
        )
    return value


def _overrides(name: str, key: object, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}[{key!r}] must be a dict of Matomo parameters, got {value!r}")
    details: dict[str, Any] = {}
    for param, item in value.items():
        if not isinstance(param, str) or not param:
            raise TypeError(f"{name}[{key!r}]: parameter names must be strings, got {param!r}")
        if param == "token_auth":
            raise ValueError(f"{name}[{key!r}]: token_auth belongs in access_token")
        if param == "cvar" and not isinstance(item, Mapping):
            raise TypeError(f"{name}[{key!r}]['cvar'] must be a dict of name -> value")
        details[param] = item
    if details.get("e_c") and not details.get("e_a"):
        raise ValueError(
            f"{name}[{key!r}]: an event needs an action 'e_a' as well as a category 'e_c' "
            "(Matomo rejects events without one)"
        )
    check_fixed(f"{name}[{key!r}]", details)
    return details


def _route_details(value: object) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"route_details must be a dict of path -> details, got {value!r}")
    routes: dict[str, dict[str, Any]] = {}
    for key, details in value.items():
        if not isinstance(key, str) or not key.startswith("/"):
            raise ValueError(
                f"route_details keys must be paths or route templates starting with '/', "
                f"got {key!r}"
            )
        # Keys are matched without converters: "/users/{id:int}" is "/users/{id}".
        routes[template_key(key)] = _overrides("route_details", key, details)
    return routes


def _custom_dimensions(value: object) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"custom_dimensions must be a dict of name -> dimension id, got {value!r}")
    dimensions: dict[str, int] = {}
    for name, dimension in value.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"custom_dimensions keys must be names, got {name!r}")
        dimensions[name] = positive_int(f"custom_dimensions[{name!r}]", dimension)
    return dimensions


def build_config(
    *,
    idsite: object,
    track_visitor_ip: bool,
    assume_https: object,
    exclude_paths: object,
    exclude_patterns: object,
    allowed_methods: object,
    ignored_methods: object,
    ignored_user_agents: object,
    route_details: object,
    action_name_from_route: object,
    custom_dimensions: object,
    trusted_proxies: object,
    anonymize_ip_bytes: object,
    forwarded_header: object = "x-forwarded-for",
    visitor_ids: object = False,
    visitor_key: object = None,
) -> TrackingConfig:
    """Validate the tracking options into the pure core's `TrackingConfig`.

    `visitor_ids` is off here and on in the middleware: the core's tests see
    hits without a `cid` unless they ask for one.
    """
    for name, flag in (
        ("assume_https", assume_https),
        ("action_name_from_route", action_name_from_route),
        ("visitor_ids", visitor_ids),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if (
        isinstance(anonymize_ip_bytes, bool)
        or not isinstance(anonymize_ip_bytes, int)
        or not 0 <= anonymize_ip_bytes <= 3
    ):
        raise ValueError(
            f"anonymize_ip_bytes must be 0, 1, 2 or 3 (as in Matomo's privacy settings), "
            f"got {anonymize_ip_bytes!r}"
        )
    if trusted_proxies is not None and not isinstance(trusted_proxies, str | Iterable):
        raise TypeError(f"trusted_proxies must be a list of addresses, got {trusted_proxies!r}")
    if forwarded_header not in FORWARDED_HEADERS:
        raise ValueError(
            f"forwarded_header must be one of {', '.join(map(repr, FORWARDED_HEADERS))} "
            f"(the header your proxy writes), got {forwarded_header!r}"
        )
    if trusted_proxies is not None and not isinstance(trusted_proxies, str):
        # Read twice below: a generator would be empty the second time.
        trusted_proxies = tuple(trusted_proxies)
    networks = parse_trusted_proxies(trusted_proxies)
    site = positive_int("idsite", idsite)
    allowed = _allowed_methods(allowed_methods)
    ignored = _methods("ignored_methods", ignored_methods)
    if ignored_methods is DEFAULT_IGNORED_METHODS and allowed is not None:
        # A method listed in allowed_methods is wanted, default or not.
        ignored -= allowed
    trust_unix = trusted_proxies is not None and any(
        isinstance(item, str) and item.strip().lower() == UNIX_SOCKET
        for item in ([trusted_proxies] if isinstance(trusted_proxies, str) else trusted_proxies)
    )
    # Read last, so that a mistake in another option never costs a key file.
    key = _visitor_key(visitor_key) if visitor_ids else None
    return TrackingConfig(
        idsite=site,
        assume_https=bool(assume_https),
        track_visitor_ip=track_visitor_ip,
        exclude_paths=frozenset(_strings("exclude_paths", exclude_paths)),
        exclude_patterns=_patterns("exclude_patterns", exclude_patterns),
        allowed_methods=allowed,
        ignored_methods=ignored,
        ignored_user_agents=_patterns("ignored_user_agents", ignored_user_agents),
        route_details=_route_details(route_details),
        action_name_from_route=bool(action_name_from_route),
        custom_dimensions=_custom_dimensions(custom_dimensions),
        trusted_proxies=networks,
        trust_unix_socket=trust_unix,
        forwarded_header=str(forwarded_header),
        anonymize_ip_bytes=anonymize_ip_bytes,
        visitor=VisitorIds(key, site) if key is not None else None,
    )
