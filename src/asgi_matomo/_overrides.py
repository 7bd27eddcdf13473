"""Override values made into Matomo parameters that can always be sent.

Overrides (`route_details`, and what a handler writes to
`scope["state"]["asgi_matomo"]`) are application code's values: any type, any
size, any text. Each is cleaned on its own, like the request's own inputs:
bytes decoded, lone surrogates replaced, clipped to what Matomo stores. A value
that cannot be made into a parameter is left out alone, with a warning; the
rest of the hit is kept. Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timezone
from typing import Any

from asgi_matomo._proxy import parse_ip

logger = logging.getLogger("asgi_matomo")

# What Matomo stores (MATOMO.md): `url` and `action_name` up to 1024 characters,
# custom dimensions up to 250, custom variable names and values up to 200, and
# the user id in a VARCHAR(200) column (plugins/CoreHome/Columns/UserId.php).
MAX_URL_LENGTH = 1024
MAX_ACTION_NAME_LENGTH = 1024
MAX_DIMENSION_LENGTH = 250
MAX_CUSTOM_VARIABLE_LENGTH = 200
MAX_USER_ID_LENGTH = 200
# The CustomVariables plugin offers 5 slots per scope unless an admin adds more.
CUSTOM_VARIABLE_SLOTS = 5
# Other free text (user agent, languages, referrer, any other parameter) is
# bounded too, so that no input can make a queued hit arbitrarily large.
MAX_TEXT_LENGTH = 2048
# Largest performance value Matomo stores (a MEDIUMINT UNSIGNED column); larger
# values are answered with success and dropped (MATOMO.md).
MAX_PERFORMANCE_MS = 16_777_215
# Matomo's tracking API has a few dozen parameters: a name longer than this is
# no parameter, and more than this many from overrides is a runaway loop, not
# analytics. Both bound the size of a hit whatever the handler writes.
MAX_PARAMETER_NAME_LENGTH = 64
MAX_OVERRIDE_PARAMETERS = 100
# Custom variables beyond Matomo's slots are left out later; this bounds the
# names kept until then (names mapped to custom dimensions are among them).
MAX_CUSTOM_VARIABLES = 100

# Matomo takes a `cdt` from 20 years back to "now" (core/Tracker/Request.php
# isTimestampValid) and silently uses its own clock for anything else. A time
# well ahead of the request is a mistake (milliseconds, a wrong time zone): the
# request's own time is closer to the truth than Matomo's time of receipt.
MAX_CDT_AGE = 20 * 365 * 86400
MAX_CDT_AHEAD = 3600

# Each kind of warning is logged at most this many times per process (for
# distinct causes), then at DEBUG only: one request with a thousand bad values
# cannot flood the log, nor use up the warnings of every other kind.
WARNINGS_PER_KIND = 5
# In log lines, a value is shown by its start only.
_SHOWN_LENGTH = 80

_LIMITS = {
    "url": MAX_URL_LENGTH,
    "action_name": MAX_ACTION_NAME_LENGTH,
    "uid": MAX_USER_ID_LENGTH,
}
_DIMENSION = re.compile(r"dimension[0-9]+")
# `_id` is read as hex (MATOMO.md, core/Tracker/Request.php getVisitorId). A `cid`
# Matomo would refuse (400, the whole hit lost) is not refused here: the visitor-id
# step after the merge (`_core._set_visitor`) hashes it to one Matomo accepts.
_VISITOR_ID = re.compile(r"[0-9a-fA-F]{16}")
_VISITOR_ID_KEYS = frozenset({"_id"})
_BYTES_TYPES = (bytes, bytearray, memoryview)
# Matomo's parameter names (`idsite`, `_id`, `e_c`, `dimension3`, `pf_srv`), and PHP's
# array form `name[key]`. Anything else is a mistake that PHP would not even keep
# as written: it reads `a.b` and `a b` as `a_b`, and `a&b=c` would add a parameter.
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+(?:\[[A-Za-z0-9_]*\])*")
# Names already found valid: a set lookup instead of a match, for each override.
_valid_names: set[str] = set()
_VALID_NAMES_KEPT = 1024
# Who the visitor is stays out of log lines: such values are shown by their type.
_PERSONAL_KEYS = frozenset({"cip", "uid", "cid", "_id"})

# Never taken from overrides into the query: the token lives in the POST body only.
# `cip` and `cdt` are not dropped: they feed the `Hit` fields the sender controls.
RESERVED_KEYS = frozenset({"token_auth", "cip", "cdt", "idsite", "rec"})

_warned: dict[str, set[str]] = {}


class _RefusedError(ValueError):
    """A value Matomo would refuse: `reason` completes "<value> ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def warn_once(key: str, message: str, *args: object) -> None:
    """Warn about a misuse once per distinct cause, within a budget per kind.

    The kind is the key up to its first colon (`cvar-slots:plan` is of kind
    `cvar-slots`). Past the budget, or for a cause already reported, DEBUG only.
    """
    kind = key.partition(":")[0]
    seen = _warned.setdefault(kind, set())
    if key in seen or len(seen) >= WARNINGS_PER_KIND:
        logger.debug(message, *args)
        return
    seen.add(key)
    if len(seen) == WARNINGS_PER_KIND:
        message += " (further warnings of this kind are logged at DEBUG level)"
    logger.warning(message, *args)


def shown(value: object) -> str:
    """A value for a log line: its repr, cut short; never raises."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN_LENGTH else text[:_SHOWN_LENGTH] + "..."


def clip_text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit]


def clip_url(value: str, limit: int) -> str:
    """Truncate without leaving half a percent-escape at the end."""
    if len(value) <= limit:
        return value
    clipped = value[:limit]
    cut = clipped.rfind("%", len(clipped) - 2)
    return clipped[:cut] if cut != -1 else clipped


def clean_text(value: str, limit: int) -> str:
    """`value` as an exact `str`, clipped, with lone surrogates replaced (U+FFFD).

    Python text may hold lone surrogates (from `surrogateescape`, or JSON);
    UTF-8 cannot, so such text could not be percent-encoded as Matomo reads it.
    A surrogate pair becomes the character it stands for.
    """
    if value.__class__ is not str:
        # A subclass may redefine len(), slicing or encode(): use the text only.
        value = str.__str__(value)
    if len(value) > limit:
        value = value[:limit]
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _decode(value: bytes | bytearray | memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def _json_default(value: object) -> object:
    if isinstance(value, _BYTES_TYPES):
        return _decode(value)
    return str(value)


def param_value(value: object, limit: int = MAX_TEXT_LENGTH) -> str | None:
    """How an override value is written as a Matomo parameter; None means omit.

    Raises whatever the value raises when made into text (a `__str__` that
    fails, an integer too long to print, a self-containing list): the caller
    leaves that value out.
    """
    if value.__class__ is str:
        # What handlers nearly always write: short plain text, kept as it is.
        return value if len(value) <= limit and value.isascii() else clean_text(value, limit)
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return clean_text(value, limit)
    if isinstance(value, _BYTES_TYPES):
        return clean_text(_decode(value[: 4 * limit]), limit)
    if isinstance(value, int | float):
        # int.__str__/float.__repr__: a subclass's own __str__ (an IntEnum's
        # name, say) is no number Matomo reads.
        text = int.__str__(value) if isinstance(value, int) else float.__repr__(value)
        return clean_text(text, limit)
    if isinstance(value, Mapping | list | tuple):
        if not isinstance(value, dict | list | tuple):
            value = dict(value)  # json writes only dicts among mappings
        text = json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), default=_json_default, skipkeys=True
        )
        return clean_text(text, limit)
    return clean_text(str(value), limit)


def performance_value(value: object) -> str | None:
    """Matomo keeps `pf_*` only as whole milliseconds in 0..16777215 (MATOMO.md)."""
    if value.__class__ is float and math.isfinite(value):
        # The middleware's own measure, once per request: the isinstance checks
        # below are for what handlers write.
        ms = round(value)
        return str(ms) if 0 <= ms <= MAX_PERFORMANCE_MS else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # Compared as an integer: a huge one does not fit in a float.
        return str(int(value)) if 0 <= value <= MAX_PERFORMANCE_MS else None
    if isinstance(value, _BYTES_TYPES):
        value = _decode(value[:64])
    if isinstance(value, str):
        try:
            value = float(value[:64])
        except ValueError:
            return None
    if not isinstance(value, float) or not math.isfinite(value):
        return None
    ms = round(value)
    if 0 <= ms <= MAX_PERFORMANCE_MS:
        return str(ms)
    return None


def _limit_of(key: str) -> int:
    limit = _LIMITS.get(key)
    if limit is not None:
        return limit
    if key.startswith("dimension") and _DIMENSION.fullmatch(key):
        return MAX_DIMENSION_LENGTH
    return MAX_TEXT_LENGTH


def _parameter(key: str, value: object) -> str | None:
    """The cleaned parameter for `key`; None removes it. Raises when `value` has no text."""
    if key.startswith("pf_"):
        return performance_value(value)
    if key == "url":
        text = param_value(value, 4 * MAX_URL_LENGTH)
        return clip_url(text, MAX_URL_LENGTH) if text is not None else None
    text = param_value(value, _limit_of(key))
    if text is not None and key in _VISITOR_ID_KEYS and not _VISITOR_ID.fullmatch(text):
        raise _RefusedError("is not 16 hexadecimal characters: Matomo would refuse the hit")
    return text


def _cip(value: object) -> str | None:
    """A `cip` override: an IP address as text, or None to send none."""
    if value is None:
        return None
    text = param_value(value, 64)
    address = parse_ip(text) if text else None
    if address is None:
        raise _RefusedError("is not an IP address: the request's address is used")
    return str(address)


def _dropped(key: str, value: object, exc: Exception) -> None:
    value_shown = shown(value) if key not in _PERSONAL_KEYS else f"<{type(value).__name__}>"
    if isinstance(exc, _RefusedError):
        warn_once(
            f"refused:{key}",
            "asgi_matomo: override %r left out: %s %s",
            key,
            value_shown,
            exc.reason,
        )
        return
    warn_once(
        f"unwritable:{key}",
        "asgi_matomo: override %r left out: its value %s of type %s cannot be written as "
        "text (%s: %s); the rest of the hit is sent",
        key,
        value_shown,
        type(value).__name__,
        type(exc).__name__,
        shown(str(exc)) if not isinstance(exc, RecursionError) else "too deeply nested",
    )


def merge_overrides(
    params: dict[str, str],
    custom: dict[str, str],
    source: Mapping[Any, Any],
    hit: MutableMapping[str, Any],
) -> None:
    """Apply one layer of overrides (route details, then the request's own).

    `custom` collects custom variables (`cvar`), `hit` the values that are no
    query parameter (`cip`, `cdt`); the other `RESERVED_KEYS` are never taken.
    Nothing here raises: a value that cannot be cleaned is left out alone.
    """
    try:
        items = list(source.items())
    except Exception as exc:
        warn_once(
            "overrides",
            "asgi_matomo: overrides of type %s cannot be read (%s); the hit is sent without them",
            type(source).__name__,
            type(exc).__name__,
        )
        return
    added = 0
    for key, value in items:
        if key.__class__ is not str or key not in _valid_names:
            # Handlers write this dict freely; a non-string key is not a parameter.
            if not isinstance(key, str):
                continue
            key = str.__str__(key)
            if not is_parameter_name(key):
                warn_once(
                    f"parameter-name:{shown(key)}",
                    "asgi_matomo: override %s left out: no Matomo parameter has such a name; %s",
                    shown(key),
                    NAME_RULE,
                )
                continue
        try:
            if key == "cvar":
                _merge_custom_variables(custom, value)
            elif key == "cip":
                hit[key] = _cip(value)
            elif key == "cdt":
                hit[key] = value
            elif key in RESERVED_KEYS:
                continue
            else:
                text = _parameter(key, value)
                if text is None:
                    params.pop(key, None)
                elif key in params or added < MAX_OVERRIDE_PARAMETERS:
                    added += key not in params
                    params[key] = text
                else:
                    warn_once(
                        "too-many-parameters",
                        "asgi_matomo: override %r left out: more than %d parameters were set",
                        key,
                        MAX_OVERRIDE_PARAMETERS,
                    )
        except Exception as exc:
            _dropped(key, value, exc)


NAME_RULE = (
    "a Matomo parameter name has letters, digits and _ only (e_c, dimension3),"
    " or PHP's array form name[key]"
)


def is_parameter_name(key: str) -> bool:
    """Whether `key` may be a Matomo tracking parameter's name (remembered when it is)."""
    if key in _valid_names:
        return True
    if len(key) > MAX_PARAMETER_NAME_LENGTH or not _PARAMETER_NAME.fullmatch(key):
        return False
    if len(_valid_names) < _VALID_NAMES_KEPT:
        _valid_names.add(key)
    return True


def check_fixed(name: str, details: Mapping[str, Any]) -> None:
    """Refuse at start-up the fixed overrides (`route_details`) a request would leave out.

    `name` names the option in the error (`route_details['/about']`). Values are
    only tried here; each request cleans them again.
    """
    for key, value in details.items():
        where = f"{name}[{key!r}]"
        if not is_parameter_name(key):
            raise ValueError(f"{where}: no Matomo parameter has such a name; {NAME_RULE}")
        try:
            if key == "cvar" and isinstance(value, Mapping):
                for variable, item in value.items():
                    param_value(variable)
                    param_value(item)
            elif key == "cip":
                _cip(value)
            elif key == "cdt":
                _check_time(value)
            elif key.startswith("pf_"):
                if value is not None and performance_value(value) is None:
                    raise _RefusedError("is not whole milliseconds from 0 to 16777215")
            elif key not in RESERVED_KEYS:
                _parameter(key, value)
        except _RefusedError as exc:
            raise ValueError(f"{where}: {shown(value)} {exc.reason}") from None
        except Exception as exc:
            raise TypeError(
                f"{where}: the {type(value).__name__} value cannot be written as text "
                f"({type(exc).__name__}: {shown(str(exc))})"
            ) from exc


def _check_time(value: object) -> None:
    try:
        seconds = _seconds(value) if value is not None else 1
    except Exception:
        seconds = None
    if seconds is None or not 0 < seconds < math.inf:
        raise _RefusedError("is not a time Matomo reads (a unix time, a datetime, or text)")


def _merge_custom_variables(custom: dict[str, str], variables: object) -> None:
    if not isinstance(variables, Mapping):
        if variables is not None:
            warn_once(
                "cvar-type",
                "asgi_matomo: cvar override %s is not a mapping of names to values; ignored",
                shown(variables),
            )
        return
    for name, item in list(variables.items()):
        try:
            text_name = param_value(name, MAX_CUSTOM_VARIABLE_LENGTH)
            text = param_value(item, MAX_CUSTOM_VARIABLE_LENGTH)
        except Exception as exc:
            _dropped(f"cvar[{shown(name)}]", item, exc)
            continue
        if text_name is None or text is None:
            continue
        if text_name in custom or len(custom) < MAX_CUSTOM_VARIABLES:
            custom[text_name] = text
        else:
            warn_once(
                "cvar-count",
                "asgi_matomo: custom variable %s left out: more than %d were set",
                shown(text_name),
                MAX_CUSTOM_VARIABLES,
            )


def timestamp(value: object, default: float) -> float:
    """A `cdt` override as a unix time: a number, a datetime, or Matomo's text form.

    Anything else (not a time, or out of the range Matomo takes around the
    request's own time `default`) keeps the request time, with a warning: one
    bad value must never make a hit impossible to encode. Never raises.
    """
    if value is None:
        return default
    try:
        seconds = _seconds(value)
    except Exception:
        seconds = None
    if seconds is None:
        warn_once("cdt:type", "asgi_matomo: cdt override %s is not a time; ignored", shown(value))
        return default
    if default - MAX_CDT_AGE < seconds <= default + MAX_CDT_AHEAD:
        return float(seconds)
    in_ms = 100 * default < seconds < 10_000 * default
    unit = " (milliseconds? cdt is in seconds)" if in_ms else ""
    warn_once(
        "cdt:range",
        "asgi_matomo: cdt override %s is not a time Matomo accepts (up to 20 years before "
        "the request)%s; the request time is used",
        shown(value),
        unit,
    )
    return default


def _seconds(value: object) -> float | int | None:
    """A unix time from the forms Matomo reads; None when `value` is none of them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    if isinstance(value, _BYTES_TYPES):
        value = _decode(value[:64])
    if isinstance(value, str):
        text = value.strip()[:64]
        try:
            value = float(text)
        except ValueError:
            # Matomo's documented form, in UTC (MATOMO.md).
            parsed = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
            return parsed.replace(tzinfo=timezone.utc).timestamp()
    if isinstance(value, int):
        # Compared as an integer: 10**400 does not fit in a float.
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else -math.inf
    return None
