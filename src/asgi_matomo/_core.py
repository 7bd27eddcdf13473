"""The sans-IO heart: one ASGI request in, the exact Matomo tracking parameters out.

Nothing here touches the network, the clock or the event loop: the middleware
passes in times and the response status, and gets `Hit`s back. That is what makes
every parameter testable as a plain function call. This module builds the hits;
reading the request (`_request`, `_headers`), its route (`_routes`) and encoding
the query (`_encoding`) have their own modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from asgi_matomo._encoding import CACHE_SIZE, encode_query, quote_value
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
from asgi_matomo._proxy import anonymize_ip

# Reading the request, its route and its state have their own modules; their
# names stay importable from here, the one entry point of the pure part.
from asgi_matomo._request import RequestInfo as RequestInfo
from asgi_matomo._request import TrackingConfig as TrackingConfig
from asgi_matomo._request import inspect_request as inspect_request
from asgi_matomo._routes import lookup_route_details as lookup_route_details
from asgi_matomo._routes import route_template as route_template
from asgi_matomo._routes import template_key as template_key
from asgi_matomo._state import STATE_KEY as STATE_KEY
from asgi_matomo._visitor import valid_cid

# The two custom variables every hit carries, in this slot order.
STATUS_VARIABLE = "http_status_code"
METHOD_VARIABLE = "http_method"
DEFAULT_VARIABLES = (STATUS_VARIABLE, METHOD_VARIABLE)

NOT_FOUND = 404
NOT_FOUND_ACTION_NAME = "(not found)"
EVENT_KEYS = ("e_c", "e_a", "e_n", "e_v")
# Parameters that describe the page view only. An event hit must not repeat them:
# `new_visit` twice would start two visits, a second `urlref` could re-attribute it.
PAGE_ONLY_KEYS = frozenset({"action_name", "cvar", "new_visit", "urlref", "search", "search_cat"})


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


@lru_cache(maxsize=CACHE_SIZE)
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
