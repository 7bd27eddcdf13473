"""Browser and operating system names read from a user agent, for the collector's page.

The names come from ua-parser, the Python port of uap-core (the rule set that log
analysers share, updated with new browsers every month). It is an optional extra
(`pip install ".[collector]"` in a clone; PyPI's `asgi-matomo` is another library):
without it the page shows the raw text,
so the stand-in never needs more than the library itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

__all__ = ["Software", "describe"]

# Distinct user agents remembered: the page asks again on every refresh.
CACHE_SIZE = 512
# Parsing takes time in proportion to the text (about 10 ms per kB in pure Python):
# a hit may carry any text, real user agents are a few hundred characters.
MAX_PARSED_LENGTH = 512

_Parse = Callable[[str], Any]


@cache
def _parser() -> _Parse | None:
    # Imported on first use: the collector's other commands do not pay for it.
    try:
        from ua_parser import parse
    except ImportError:
        return None
    return parse


@dataclass(frozen=True)
class Software:
    """What a user agent says it runs on; None for what the parser did not recognise."""

    browser: str | None
    os: str | None
    device: str | None


def _name(part: Any) -> str | None:
    """`family major.minor` of a ua-parser result part (the way Matomo shows versions)."""
    if part is None or not part.family or part.family == "Other":
        return None
    version = ".".join(v for v in (part.major, part.minor) if v)
    return f"{part.family} {version}" if version else str(part.family)


def describe(user_agent: str) -> Software | None:
    """The browser, OS and device in `user_agent`; None when ua-parser is not installed."""
    return _describe(user_agent[:MAX_PARSED_LENGTH])


@lru_cache(maxsize=CACHE_SIZE)
def _describe(user_agent: str) -> Software | None:
    parse = _parser()
    if parse is None:
        return None
    result = parse(user_agent)
    device = result.device
    device_name = None
    if device is not None and device.family not in ("Other", "Spider", ""):
        device_name = str(device.family)
    return Software(_name(result.user_agent), _name(result.os), device_name)
