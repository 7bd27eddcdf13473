"""Matomo's bulk tracking API without I/O: the request body, and what an answer means.

The sender owns the connection; this module only turns hits into the bytes of a
bulk request and an HTTP answer into a verdict (tracked, retry, refused), so the
rules that decide whether a hit was recorded can be read, and tested, on their own.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# 408 and 429 say "later"; so does every 5xx (a rolled-back bulk transaction, an
# overloaded proxy).
RETRY_STATUSES = frozenset({408, 429})
# How much of a refusal a log line quotes.
BODY_EXCERPT = 200
# How much of a 2xx answer that is not Matomo's (an HTML page) a log line shows.
PAGE_EXCERPT = 100

# Every byte a percent-encoded query may hold and a JSON string may hold as it is:
# printable ASCII but the quote and the backslash.
_JSON_PLAIN = bytes(range(0x20, 0x7F)).replace(b'"', b"").replace(b"\\", b"")


class Kind(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Answer:
    """What a bulk request came to."""

    kind: Kind
    tracked: int = 0
    invalid: int = 0
    status: int | None = None
    cause: str = ""
    retry_after: float | None = None
    # A 2xx answer that no Matomo gives: the URL is not its tracking endpoint.
    foreign: bool = False


def bulk_body(requests: list[str], token: str | None) -> bytes:
    """The JSON body of a bulk request: `{"requests": [...], "token_auth": ...}`.

    Hits are percent-encoded query strings, which JSON takes without escaping:
    joining them is about four times cheaper than `json.dumps`, which matters for
    the longest step the sender takes on the app's event loop. Anything that would
    need escaping (a hit not made by our encoder) goes through `json.dumps`.
    """
    joined = '{"requests":["' + '","'.join(requests) + '"]'
    body = joined.encode("utf-8", "surrogatepass") if requests else b""
    # What is left after deleting the plain bytes must be the structure's own quotes.
    if not requests or body.translate(None, _JSON_PLAIN) != b'"' * (2 * len(requests) + 2):
        body = json.dumps({"requests": requests}, separators=(",", ":")).encode()[:-1]
    if token is not None:
        body += b',"token_auth":' + json.dumps(token).encode()
    return body + b"}"


def read_answer(
    status: int,
    text: str,
    hits: int,
    *,
    header: Callable[[str], str | None],
    now: Callable[[], float],
    excerpt: Callable[[str, int], str],
    size: int | None = None,
) -> Answer:
    """The verdict on Matomo's answer to a bulk request of `hits` hits.

    `header(name)` reads a response header and `now()` the wall clock (for a
    Retry-After date); each is called only by the answers that need it, as the
    common one (a 200 with counts) needs neither. `excerpt(text, limit)` shortens
    an answer for a log line (the sender masks its token there). `size` is the
    answer's length in bytes, for an answer that is not text (a GIF), which a log
    line describes instead of quoting.
    """
    if 200 <= status < 300:
        counts = parse_counts(text, hits)
        if counts is not None:
            return Answer(Kind.OK, tracked=counts[0], invalid=counts[1], status=status)
        content_type = header("Content-Type")
        if status == 204 or not text.strip() or is_gif(content_type, text):
            # A single hit's answers, and QueuedTracking's: accepted, no counts.
            return Answer(Kind.OK, tracked=hits, status=status)
        # A login page, a captive portal, Matomo's index.php: nothing was recorded.
        what = describe(content_type, text, size, PAGE_EXCERPT, excerpt)
        return Answer(Kind.REFUSED, status=status, cause=f"HTTP {status}, {what}", foreign=True)
    if status in RETRY_STATUSES or status >= 500:
        delay = parse_retry_after(header("Retry-After"), now())
        return Answer(Kind.RETRY, status=status, cause=f"HTTP {status}", retry_after=delay)
    if 300 <= status < 400:
        # httpx does not follow redirects, and a redirected POST would lose its body.
        location = header("Location")
        if location is not None:  # it may fill a whole response head: cut for the log line
            location = excerpt(location, BODY_EXCERPT)
        return Answer(Kind.REFUSED, status=status, cause=f"redirected to {location}: use that URL")
    # QueuedTracking answers a bulk with cip and a rejected token 400 with its GIF.
    content_type = header("Content-Type")
    if is_text(content_type, text):
        cause = excerpt(text, BODY_EXCERPT)
    else:
        cause = describe(content_type, text, size, BODY_EXCERPT, excerpt)
    return Answer(Kind.REFUSED, status=status, cause=cause)


def is_text(content_type: str | None, text: str) -> bool:
    """Whether an answer may be quoted in a log line: text, not a GIF or other bytes."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        return media.startswith("text/") or media.endswith(("json", "xml", "javascript"))
    # No content type: text if what a log line would show is printable.
    return all(c.isprintable() or c in "\t\r\n" for c in text[:BODY_EXCERPT])


def describe(
    content_type: str | None,
    text: str,
    size: int | None,
    limit: int,
    excerpt: Callable[[str, int], str],
) -> str:
    """An answer for a log line: its type and the start of it, or its size when not text."""
    kind = content_type or "no content type"
    if is_text(content_type, text):
        return f"{kind}: {excerpt(text, limit)!r}"
    if size is None:
        size = len(text.encode("utf-8", "surrogateescape"))
    return f"{kind}, {size} bytes"


def parse_counts(text: str, n: int) -> tuple[int, int] | None:
    """(tracked, invalid) from a 2xx bulk answer; None when it is not Matomo's JSON.

    Matomo answers every bulk request it handled with its counts (MATOMO.md), and
    with QueuedTracking a 204 or a GIF, never JSON: a JSON answer without counts
    comes from something else (an API, a proxy), which recorded nothing.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    tracked = data.get("tracked") if isinstance(data, dict) else None
    if not isinstance(tracked, int) or isinstance(tracked, bool):
        return None
    # Elements Matomo skipped without counting them (it does that for malformed
    # ones) are lost all the same: count them invalid so the books balance.
    tracked = min(max(tracked, 0), n)
    return tracked, n - tracked


def is_gif(content_type: str | None, text: str) -> bool:
    """Matomo's tracking pixel, by its content type or, without one, its first bytes."""
    if content_type is not None:
        return content_type.split(";", 1)[0].strip().lower() == "image/gif"
    return text.startswith("GIF8")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)
