"""Who the visitor is, for Matomo: a visitor id (`cid`) on every hit, without the IP.

Matomo tells visitors apart by a fingerprint of the IP the hit carries (without a
token: the app server's, the same for everyone) unless the hit names a visitor
with `cid` (MATOMO.md, "Visitors and visits"). The id chosen here, in order:

1. the JavaScript tracker's first-party cookie `_pk_id.<idsite>.<hash>`, so that
   server-side hits join the browser's visitor;
2. otherwise 16 hex characters of a keyed BLAKE2b hash of the UTC day, the site,
   the visitor's IP (as resolved through trusted proxies) and user agent: the
   same visitor gets the same id all day, in every process that has the same
   key, and another id the next day. Neither the IP nor the key leaves the
   process.

An id the app supplies (the `visitor_id` option) is hashed with the same key, and
a `uid` wins over all of these (the core leaves `cid` out: Matomo derives the
visitor from the user id). Pure: the key, the time and the request's values come
in, ids go out; the key's source is `_visitor_key`.
"""

from __future__ import annotations

import hashlib
import re

# Matomo answers 400 to a `cid` that is not exactly 16 characters (MATOMO.md).
VISITOR_ID_LENGTH = 16
SECONDS_PER_DAY = 86400
# Distinct (IP, user agent) pairs remembered for the current day. Cleared when
# full: a miss costs one hash, so a flood of made-up user agents costs CPU, never
# memory.
CACHE_SIZE = 4096
_HEX_ID = re.compile(r"[0-9a-fA-F]{16}")
# Domain separation: the same key never hashes a day's visitor and an app's id
# into the same value (BLAKE2's personalisation, at most 16 bytes).
_DAILY = b"asgi-matomo/day"
_APP = b"asgi-matomo/app"
_KEY = b"asgi-matomo/key"


def cookie_pattern(idsite: int) -> re.Pattern[bytes]:
    """The JS tracker's `_pk_id.<idsite>.<hash>=<16 hex>.<created>...` in a Cookie header."""
    # One compiled pattern per site, searched in C: no Python loop over cookies.
    return re.compile(
        rb'(?:^|[;,])\s*_pk_id\.%d\.[^=;,\s]*\s*=\s*"?([0-9A-Fa-f]{16})(?![0-9A-Za-z])' % idsite
    )


def cookie_visitor_id(header: bytes | bytearray, pattern: re.Pattern[bytes]) -> str | None:
    """The visitor id of the site's `_pk_id` cookie, lowercased; None when absent or malformed."""
    found = pattern.search(header)
    return found.group(1).decode("ascii").lower() if found is not None else None


def valid_cid(value: object) -> str | None:
    """A `cid` as Matomo accepts it (16 hex, lowercased), else None."""
    return value.lower() if isinstance(value, str) and _HEX_ID.fullmatch(value) else None


class VisitorIds:
    """Derives visitor ids for one site with one secret key.

    The key is kept only in derived form and shown by no repr, log line or
    error: whoever has it and a visitor's IP and user agent can recompute that
    visitor's ids.
    """

    __slots__ = ("_key", "cookie", "ids", "idsite", "since", "until")

    def __init__(self, key: bytes, idsite: int) -> None:
        # Any length of secret in, a full-size BLAKE2b key out.
        self._key = hashlib.blake2b(key, digest_size=64, person=_KEY).digest()
        self.idsite = idsite
        self.cookie = cookie_pattern(idsite)
        # The cache: ids of (IP, user agent) for the UTC day [since, until).
        self.since = self.until = 0.0
        self.ids: dict[tuple[str | None, str | None], str] = {}

    def __repr__(self) -> str:
        return f"VisitorIds(idsite={self.idsite})"

    def daily_id(self, ip: str | None, user_agent: str | None, now: float) -> str:
        """The visitor's id for the UTC day of `now` (a unix time)."""
        day = int(now // SECONDS_PER_DAY)
        ids = self.ids
        if not self.since <= now < self.until:
            ids.clear()
            self.since = float(day * SECONDS_PER_DAY)
            self.until = self.since + SECONDS_PER_DAY
        found = ids.get((ip, user_agent))
        if found is None:
            if len(ids) >= CACHE_SIZE:
                ids.clear()
            found = ids[ip, user_agent] = self._hash(_DAILY, day, ip or "", user_agent or "")
        return found

    def app_id(self, value: object) -> str | None:
        """An id the app knows (account, device, ...) as 16 hex; None for no id."""
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("utf-8", "replace")
        elif isinstance(value, str | int):
            text = str(value)
        else:
            return None
        return self._hash(_APP, 0, text, "") if text else None

    def cid(self, value: object) -> str | None:
        """A `cid` a handler set: kept when Matomo accepts it as is, else hashed like `app_id`."""
        return valid_cid(value) or self.app_id(value)

    def _hash(self, person: bytes, day: int, first: str, second: str) -> str:
        # Lengths in front: no two different inputs can make the same message.
        message = f"{day}:{self.idsite}:{len(first)}:{first}:{second}"
        return hashlib.blake2b(
            message.encode("utf-8", "surrogatepass"),
            key=self._key,
            digest_size=VISITOR_ID_LENGTH // 2,
            person=person,
        ).hexdigest()
