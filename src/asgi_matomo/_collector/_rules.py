"""Matomo's tracking rules, sans-IO: parameters in, the row Matomo stores or why it refuses.

Every rule follows what Matomo's tracker does (read from its source and verified
on a real Matomo 5.1.2, see MATOMO.md); the collector's endpoints apply them.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from urllib.parse import parse_qsl

from asgi_matomo._collector._model import CustomVariables, HitType

__all__ = [
    "BLOCKED_MESSAGE",
    "BRUTE_FORCE_LIMIT",
    "DIGITS",
    "EMPTY_REQUEST_TEXT",
    "ERROR_TEXT",
    "GIF",
    "TRACKING_PATHS",
    "InvalidHitError",
    "blocked_message",
    "bulk_element",
    "hit_row",
    "is_bulk",
    "is_recording",
    "query_params",
    "shape",
    "site_id",
]

TRACKING_PATHS = frozenset({"/matomo.php", "/piwik.php"})
# Matomo's own transparent 1x1 GIF (core/Tracker/Response.php).
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAAAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
# What Matomo prints for a tracking request without any parameter.
EMPTY_REQUEST_TEXT = (
    b"This resource is part of Matomo. Keep full control of your data with the leading"
    b" free and open source web analytics & conversion optimisation platform.<br>\n"
    b"This file is the endpoint for the Matomo tracking API. If you want to access the"
    b" Matomo UI or use the Reporting API, please use index.php instead.\n"
)
# Matomo hides the reason of a 400 unless debugging is allowed.
ERROR_TEXT = b"<html><body><p>An error occurred while processing the request.</p></body></html>\n"
BLOCKED_MESSAGE = (
    "You are currently not allowed to log in because you had too many failed logins,"
    " try again later."
)
# A hit stamped with `cdt` older than this needs the token (MATOMO.md, `cdt`).
UNAUTHENTICATED_MAX_AGE = 86400.0
# Matomo ignores a `cdt` older than this and records the receive time instead.
MAX_CDT_AGE = 20 * 365 * 86400.0
MAX_URL_LENGTH = 1024
MAX_DIMENSION_LENGTH = 250
MAX_CVAR_LENGTH = 200
MAX_CVAR_SLOTS = 5
# `pf_srv` is stored in an unsigned MEDIUMINT column: larger values are dropped.
MAX_PF_SRV = 16777215
CID_LENGTH = 16
# Failed logins after which Matomo's brute-force protection blocks the peer.
BRUTE_FORCE_LIMIT = 20
HTTP_STATUS_NAMES = frozenset({"http_status_code", "http_status"})
# A refusal names the served sites, up to this many.
MAX_SITES_SHOWN = 10

# Bounded: int() refuses strings of thousands of digits (ValueError), and no
# number Matomo reads (site ids, slots, counts, times) needs more than 18.
DIGITS = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_HEX_ID = re.compile(r"[0-9a-fA-F]{16}")
_DIMENSION = re.compile(r"dimension([0-9]{1,18})")


class InvalidHitError(Exception):
    """Matomo refuses the hit: 400 for a single hit, counted `invalid` in a bulk.

    `kind` names the rule (one of a few fixed names); `reason` tells apart the
    mistakes of one kind (which site, which token state): the console's rate
    limit is per (kind, reason). The message says what was wrong and how to fix it.
    """

    def __init__(self, kind: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason


def _truncate(value: str | None, limit: int) -> str | None:
    return None if value is None else value[:limit]


def _nonempty(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    return value if value else None


def _parse_cdt(value: str, now: float) -> float | None:
    """The hit time from `cdt`, or None when Matomo would ignore it."""
    if _DECIMAL.fullmatch(value):
        stamp = float(value)
    else:
        try:
            parsed = datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None
        stamp = parsed.replace(tzinfo=timezone.utc).timestamp()
    # Matomo's isTimestampValid(): not in the future, not absurdly old.
    if stamp > now or stamp < now - MAX_CDT_AGE:
        return None
    return stamp


def _parse_pf_srv(value: str | None) -> int | None:
    # MATOMO.md: 201 stored; 201.5, -1 and > 16777215 silently dropped.
    if value is None or not DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if number <= MAX_PF_SRV else None


def _parse_float(value: str | None) -> float | None:
    if value is None or not _DECIMAL.fullmatch(value.strip()):
        return None
    return float(value)


def _cvar_text(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value[:MAX_CVAR_LENGTH]
    if isinstance(value, (int, float)):
        return str(value)[:MAX_CVAR_LENGTH]
    return None


def _parse_cvar(raw: str | None) -> CustomVariables | None:
    """Custom variables in slot format; invalid slots skipped like Matomo does.

    MATOMO.md: `{"1":["name","value"]}`, slots 1..5; other shapes are silently
    dropped (the upstream `{"http_status_code": 200}` has no valid slot at all).
    """
    if not raw:
        return None
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError):  # nested too deep: PHP's json_decode gives up too
        return None
    # A JSON list is a PHP array with keys 0, 1, ...: slot 0 is invalid.
    items: Iterable[tuple[object, object]]
    if isinstance(decoded, dict):
        items = decoded.items()
    elif isinstance(decoded, list):
        items = enumerate(decoded)
    else:
        return None
    slots: CustomVariables = {}
    for key, pair in items:
        slot = str(key)
        if not DIGITS.fullmatch(slot) or not 1 <= int(slot) <= MAX_CVAR_SLOTS:
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            continue
        name, value = _cvar_text(pair[0]), _cvar_text(pair[1])
        if name is None or value is None:
            continue
        slots[str(int(slot))] = [name, value]
    return slots or None


def _http_status(cvar: CustomVariables | None) -> int | None:
    for name, value in (cvar or {}).values():
        normalized = name.strip().lower().replace(" ", "_").replace("-", "_")
        if normalized in HTTP_STATUS_NAMES and DIGITS.fullmatch(value):
            return int(value)
    return None


def _dimensions(params: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in params.items():
        match = _DIMENSION.fullmatch(name)
        if match and int(match.group(1)) > 0:
            found[str(int(match.group(1)))] = value[:MAX_DIMENSION_LENGTH]
    return found


def _visitor_ip(cip: str) -> str:
    # Matomo stores an unparsable IP as 0.0.0.0 (IPUtils::stringToBinaryIP).
    try:
        return str(ipaddress.ip_address(cip.strip()))
    except ValueError:
        return "0.0.0.0"  # noqa: S104 - a stored value, not a bind address


def _hit_type(params: Mapping[str, str]) -> HitType:
    if _nonempty(params, "e_c"):
        return "event"
    if _nonempty(params, "search"):
        return "search"
    if _nonempty(params, "download"):
        return "download"
    if _nonempty(params, "link"):
        return "outlink"
    if params.get("ping") == "1":
        return "ping"
    return "pageview"


def is_recording(params: Mapping[str, str]) -> bool:
    # Matomo reads `rec` as an int: any non-zero number asks to record.
    rec = params.get("rec", "").strip()
    return bool(DIGITS.fullmatch(rec)) and int(rec) != 0


def query_params(query: str) -> dict[str, str]:
    # PHP keeps the last value of a repeated name, like dict() does.
    return dict(parse_qsl(query, keep_blank_values=True))


def _element_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def bulk_element(element: object) -> dict[str, str] | None:
    """The parameters of one bulk element, None when Matomo would skip it."""
    if isinstance(element, str):
        # Matomo takes the query part of the element, as parse_url() sees it.
        _, sep, query = element.partition("?")
        params = query_params(query.partition("#")[0]) if sep else {}
    elif isinstance(element, dict):
        params = {str(key): _element_value(value) for key, value in element.items()}
    else:
        return None
    return params or None


def is_bulk(raw: bytes) -> bool:
    # Matomo's isUsingBulkRequest(): strpos() of the quoted key, truthy when > 0.
    return raw.find(b'"requests"') > 0 or raw.find(b"'requests'") > 0


def _token_state(token: str | None) -> str:
    return "a wrong token_auth" if token else "no token_auth"


def blocked_message(peer: str) -> str:
    return (
        f"{peer} is blocked after {BRUTE_FORCE_LIMIT} wrong token_auth values, as"
        " Matomo's brute-force protection does: fix the tracker's token, then restart"
        " the collector (Matomo: wait for the block to expire)"
    )


def _json_or_none(value: object) -> str | None:
    return None if value is None else json.dumps(value)


def shape(query: str, body: bytes, *, bulk: bool) -> tuple[int, bool]:
    """How many elements a tracking request carries and whether it has a token."""
    if not bulk:
        return 1, "token_auth=" in query or b"token_auth=" in body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 0, False
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
        return 0, False
    return len(data["requests"]), b"token_auth" in body


def site_id(params: Mapping[str, str], sites: frozenset[int] | None) -> int:
    """The hit's site id; InvalidHitError when Matomo has no such site.

    `sites` are the site ids that exist; None: every site id exists.
    """
    idsite = params.get("idsite", "").strip()
    if not idsite:
        raise InvalidHitError(
            "idsite",
            "a hit without idsite (Matomo answers 400, Invalid idSite): send the"
            " site id, e.g. idsite=1 (the middleware's idsite=)",
            "missing",
        )
    if not DIGITS.fullmatch(idsite) or int(idsite) < 1:
        raise InvalidHitError(
            "idsite",
            f"idsite {idsite[:20]!r} is not a site id: send a positive integer",
            f"not a site id {idsite[:20]!r}",
        )
    site = int(idsite)
    if sites is not None and site not in sites:
        served = ", ".join(map(str, sorted(sites)[:MAX_SITES_SHOWN]))
        if len(sites) > MAX_SITES_SHOWN:
            served += ", ..."
        raise InvalidHitError(
            "idsite",
            f"idsite {site} is not served (sites: {served}): drop --sites to serve"
            f" every site, or add {site} to it",
            f"not served {site}",
        )
    return site


def hit_row(
    params: dict[str, str],
    *,
    idsite: int,
    token: str | None,
    authorized: bool,
    token_fix: str,
    peer: str,
    user_agent: str | None,
    accept_language: str | None,
    now: float,
) -> dict[str, object]:
    """The row Matomo would store for one hit; InvalidHitError when it refuses it.

    `authorized` tells whether `token` is right; `token_fix` says how to fix a
    wrong one; `peer`, `user_agent` and `accept_language` come from the HTTP request.
    """
    hit_time = now
    cdt = params.get("cdt", "").strip()
    if cdt:
        stamp = _parse_cdt(cdt, now)
        if stamp is not None:
            if now - stamp >= UNAUTHENTICATED_MAX_AGE and not authorized:
                raise InvalidHitError(
                    "cdt",
                    f"cdt {cdt[:30]!r} is older than 24 hours and the hit has"
                    f" {_token_state(token)}: {token_fix}",
                    _token_state(token),
                )
            hit_time = stamp
    cid = params.get("cid", "")
    if cid and len(cid) != CID_LENGTH:
        raise InvalidHitError(
            "cid",
            f"cid {cid[:40]!r} is not 16 characters: send 16 hex characters, or no cid",
        )
    cip = params.get("cip", "")
    if cip and not authorized:
        state = _token_state(token)
        raise InvalidHitError("cip", f"cip with {state}: {token_fix}, or send no cip", state)
    hit_type = _hit_type(params)
    if hit_type == "event" and not params.get("e_a", "").strip():
        raise InvalidHitError(
            "event",
            f"an event (e_c={params['e_c'][:40]!r}) without e_a: an event needs an action",
        )
    cvar = _parse_cvar(params.get("cvar"))
    visit_id = _nonempty(params, "_id")
    search_count = params.get("search_count", "")
    url = {"download": "download", "outlink": "link"}.get(hit_type, "url")
    return {
        "time": hit_time,
        "received": now,
        "idsite": idsite,
        "hit_type": hit_type,
        "url": _truncate(_nonempty(params, url), MAX_URL_LENGTH),
        # An event keeps no page title (MATOMO.md: action_name dropped).
        "action_name": _truncate(_nonempty(params, "action_name"), MAX_URL_LENGTH)
        if hit_type == "pageview"
        else None,
        "urlref": _truncate(_nonempty(params, "urlref"), MAX_URL_LENGTH),
        "e_c": _nonempty(params, "e_c") if hit_type == "event" else None,
        "e_a": _nonempty(params, "e_a") if hit_type == "event" else None,
        "e_n": _nonempty(params, "e_n") if hit_type == "event" else None,
        "e_v": _parse_float(params.get("e_v")) if hit_type == "event" else None,
        # pf_srv is kept on page views only (MATOMO.md, Performance).
        "pf_srv": _parse_pf_srv(params.get("pf_srv")) if hit_type == "pageview" else None,
        "search": _nonempty(params, "search") if hit_type == "search" else None,
        "search_cat": _nonempty(params, "search_cat") if hit_type == "search" else None,
        "search_count": int(search_count)
        if hit_type == "search" and DIGITS.fullmatch(search_count)
        else None,
        "cvar": None if cvar is None else json.dumps(cvar),
        "cvar_visit": _json_or_none(_parse_cvar(params.get("_cvar"))),
        "dimensions": json.dumps(_dimensions(params)),
        "visitor_ip": _visitor_ip(cip) if cip else peer,
        "ua": params.get("ua") or user_agent,
        "lang": params.get("lang") or accept_language,
        "uid": _nonempty(params, "uid"),
        "visitor_id": cid or (visit_id if visit_id and _HEX_ID.fullmatch(visit_id) else None),
        "http_status": _http_status(cvar),
        "params": json.dumps(params),
    }
