"""The collector's visits log: one self-contained HTML page, no external asset.

Hits carry attacker-controlled text (URLs, titles, user agents, parameter names):
every value is escaped here, on the server, and the page's script only swaps in
what the server rendered (`/visits.html`), so there is one renderer to trust. The
layout wraps at spaces; only URLs and values may break inside a word
(`overflow-wrap: anywhere`), and only when one is wider than its box.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from typing import TYPE_CHECKING, Any

from asgi_matomo._collector._assets import REFRESH_MS, SCRIPT, STYLE
from asgi_matomo._collector._useragent import describe

if TYPE_CHECKING:
    from asgi_matomo._collector._server import StoredHit
    from asgi_matomo._collector._visits import Visit

__all__ = ["COLUMNS", "action_status", "cells", "render_page", "render_visits"]

# Longer values are cut on the page (Matomo itself keeps 1024 characters of a URL).
MAX_SHOWN_LENGTH = 2000
HTTP_STATUS_NAMES = frozenset({"http_status_code", "http_status"})
TYPE_LABELS = {
    "pageview": "page view",
    "event": "event",
    "search": "site search",
    "download": "download",
    "outlink": "outlink",
    "ping": "ping",
}
# One hit as a row of text: the demo's console table.
COLUMNS = (
    "Time (UTC)",
    "Type",
    "Action",
    "URL",
    "Status",
    "pf_srv",
    "Event",
    "Custom variables",
    "Visitor IP",
)
VIA = {"uid": "from uid", "cid": "from cid", "_id": "from _id"}


def cells(hit: Mapping[str, Any]) -> list[str]:
    """The text of each of `COLUMNS` for one hit (as `StoredHit.to_json()` gives it)."""

    def text(value: object) -> str:
        return "" if value is None else str(value)

    event = " / ".join(text(hit[k]) for k in ("e_c", "e_a", "e_n", "e_v") if hit[k] is not None)
    cvar = ", ".join(f"{name}={value}" for name, value in (hit["cvar"] or {}).values())
    return [
        text(hit["time_iso"]),
        text(hit["hit_type"]),
        text(hit["action_name"] or hit["search"]),
        text(hit["url"]),
        text(hit["http_status"]),
        text(hit["pf_srv"]),
        event,
        cvar,
        text(hit["visitor_ip"]),
    ]


def _text(value: object) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_SHOWN_LENGTH:
        # A hit may carry any amount of text: the page stays a page.
        rest = len(text) - MAX_SHOWN_LENGTH
        text = f"{text[:MAX_SHOWN_LENGTH]}… ({rest} more characters)"
    return escape(text)


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%H:%M:%S")


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d")


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, whole = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {whole} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def action_status(hit: StoredHit, dimension_names: Mapping[int, str]) -> int | None:
    """The HTTP status of the request behind a hit: a custom variable or a named dimension."""
    if hit.http_status is not None:
        return hit.http_status
    for dimension, value in hit.dimensions.items():
        name = dimension_names.get(int(dimension), "")
        if name.strip().lower() in HTTP_STATUS_NAMES and value.isascii() and value.isdigit():
            return int(value)
    return None


def _status(status: int | None) -> str:
    if status is None:
        return ""
    kind = "status-error" if status >= 400 else "status-redirect" if status >= 300 else ""
    return f'<span class="status {kind}" title="HTTP status">{status}</span>'


def _vars(hit: StoredHit, dimension_names: Mapping[int, str]) -> str:
    items = []
    for name, value in (hit.cvar or {}).values():
        items.append(
            f'<li class="cvar" title="custom variable"><span class="name wrap">{_text(name)}</span>'
            f' <span class="value wrap">{_text(value)}</span></li>'
        )
    for dimension, value in sorted(hit.dimensions.items(), key=lambda item: int(item[0])):
        known = dimension_names.get(int(dimension))
        label = f'<span class="name">dimension{_text(dimension)}</span>'
        if known:
            label = (
                f'<span class="name wrap">{_text(known)}</span>'
                f' <span class="dim">dimension{_text(dimension)}</span>'
            )
        items.append(
            f'<li class="dimension" title="custom dimension {_text(dimension)}">{label}'
            f' <span class="value wrap">{_text(value)}</span></li>'
        )
    return f'<ul class="vars">{"".join(items)}</ul>' if items else ""


def _params(hit: StoredHit, key: str) -> str:
    rows = "".join(
        f'<dt class="wrap">{_text(name)}</dt><dd class="wrap">{_text(value)}</dd>'
        for name, value in sorted(hit.params.items())
    )
    count = _plural(len(hit.params), "raw parameter")
    return (
        f'<details data-key="{key}"><summary>{count}</summary><dl class="params">{rows}</dl>'
        "</details>"
    )


def _title(hit: StoredHit) -> str:
    if hit.hit_type == "search" and hit.search is not None:
        extra = [f"category {hit.search_cat}"] if hit.search_cat else []
        if hit.search_count is not None:
            extra.append(_plural(hit.search_count, "result"))
        suffix = f" ({', '.join(extra)})" if extra else ""
        return f'<span class="title wrap">{_text(hit.search + suffix)}</span>'
    if hit.action_name:
        return f'<span class="title wrap">{_text(hit.action_name)}</span>'
    if hit.hit_type == "pageview":
        return '<span class="title untitled">no title</span>'
    return ""


def _event(hit: StoredHit) -> str:
    if hit.hit_type != "event":
        return ""
    parts = [hit.e_c, hit.e_a, hit.e_n]
    text = " / ".join(part for part in parts if part is not None)
    value = "" if hit.e_v is None else f' <span class="label">value</span> {hit.e_v:g}'
    return (
        f'<div class="event"><span class="label">Event</span>'
        f' <span class="wrap">{_text(text)}</span>{value}</div>'
    )


def _action(hit: StoredHit, dimension_names: Mapping[int, str]) -> str:
    hit_type = TYPE_LABELS.get(hit.hit_type, hit.hit_type)
    timing = (
        ""
        if hit.pf_srv is None
        else f'<span class="timing" title="server time (pf_srv)">{hit.pf_srv} ms</span>'
    )
    url = f'<div class="url wrap">{_text(hit.url)}</div>' if hit.url else ""
    return (
        f'<li class="action" data-id="{hit.id}">'
        f'<div class="action-head"><time>{_clock(hit.time)}</time>'
        f' <span class="type type-{_text(hit.hit_type)}">{_text(hit_type)}</span>'
        f" {_title(hit)} {_status(action_status(hit, dimension_names))} {timing}</div>"
        f"{url}{_event(hit)}{_vars(hit, dimension_names)}{_params(hit, f'p{hit.id}')}"
        "</li>"
    )


def _visitor(visit: Visit) -> str:
    first = visit.first
    rows: list[tuple[str, str]] = []
    if visit.visitor_id is None:
        rows.append(
            ("Visitor", '<span class="note">no id sent: grouped by browser, IP and language</span>')
        )
    else:
        via = VIA.get(visit.identified_by, "")
        rows.append(
            (
                "Visitor",
                f'<span class="id">{_text(visit.visitor_id)}</span>'
                f' <span class="note">{_text(via)}</span>',
            )
        )
    if visit.uid:
        rows.append(("User ID", f'<span class="wrap">{_text(visit.uid)}</span>'))
    if visit.ip_sent:
        rows.append(("IP", f'<span class="wrap">{_text(first.visitor_ip)}</span>'))
    else:
        rows.append(
            (
                "IP",
                f'no IP sent <span class="note">(the sender\'s: {_text(first.visitor_ip)})</span>',
            )
        )
    software = describe(first.ua) if first.ua else None
    if software is not None and (software.browser or software.os):
        rows.append(("Browser", _text(software.browser or "unknown")))
        system = software.os or "unknown"
        if software.device:
            system += f", {software.device}"
        rows.append(("OS", _text(system)))
    else:
        rows.append(("User agent", f'<span class="wrap">{_text(first.ua or "none sent")}</span>'))
    rows.append(("Language", f'<span class="wrap">{_text(first.lang or "none sent")}</span>'))
    if visit.campaign is not None:
        name, keyword = visit.campaign
        keyword_text = (
            f' <span class="note">keyword</span> <span class="wrap">{_text(keyword)}</span>'
        )
        rows.append(
            (
                "Campaign",
                f'<span class="wrap">{_text(name)}</span>' + (keyword_text if keyword else ""),
            )
        )
    if visit.referrer:
        rows.append(("Referrer", f'<span class="wrap">{_text(visit.referrer)}</span>'))
    elif visit.campaign is None:
        rows.append(("Referrer", '<span class="note">none (direct entry)</span>'))
    for name, value in (first.cvar_visit or {}).values():
        rows.append(
            (
                "Visit variable",
                f'<span class="wrap">{_text(name)}</span> <span class="wrap">{_text(value)}</span>',
            )
        )
    cells = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    return f'<dl class="visitor">{cells}</dl>'


def _visit(visit: Visit, dimension_names: Mapping[int, str]) -> str:
    first = visit.first
    span = _clock(visit.started)
    if visit.ended != visit.started:
        # A visit never spans midnight (see _visits): one date is enough.
        span += f" to {_clock(visit.ended)}"
    facts = [
        _plural(len(visit.actions), "action"),
        _duration(visit.ended - visit.started),
        f"site {visit.idsite}",
    ]
    actions = "".join(_action(hit, dimension_names) for hit in visit.actions)
    return (
        f'<article class="visit" data-first="{first.id}">'
        f'<header class="visit-head"><h2>Visit on {_date(visit.started)}'
        f' <span class="clock">{span} UTC</span></h2>'
        f'<span class="facts">{" · ".join(facts)}</span></header>'
        f'<div class="visit-body">{_visitor(visit)}<ol class="actions">{actions}</ol></div>'
        "</article>"
    )


def render_visits(
    visits: Sequence[Visit],
    *,
    q: str = "",
    dimension_names: Mapping[int, str] | None = None,
    hits_kept: int = 0,
    hits_evicted: int = 0,
    hits_limit: int = 0,
    visits_limit: int | None = None,
) -> str:
    """The visits list (what `/visits.html` answers and the page starts with)."""
    names = dimension_names or {}
    actions = sum(len(visit.actions) for visit in visits)
    summary = f"{_plural(len(visits), 'visit')}, {_plural(actions, 'action')}"
    if q:
        summary += f" matching “{_text(q)}”"
    if hits_limit and hits_kept > hits_limit:
        summary += f" in the last {hits_limit} hits received"
    summary += ", newest visit first"
    shown = visits[:visits_limit]
    if len(shown) < len(visits):
        summary += f" (the {len(shown)} most recent shown)"
    if hits_evicted:
        # The oldest visits may have lost their first actions too.
        summary += (
            f". {hits_evicted:,} older {'hit' if hits_evicted == 1 else 'hits'} not kept:"
            f" the collector keeps the latest {hits_kept:,} (--max-hits)"
        )
    parts = [f'<p class="summary" id="summary">{summary}</p>']
    if not visits:
        hint = (
            "No visit matches the filter."
            if q
            else "No hit yet: send hits to <code>/matomo.php</code> on this server."
        )
        parts = [f'<p class="empty" id="summary">{hint}</p>']
    parts.extend(_visit(visit, names) for visit in shown)
    return "\n".join(parts)


def render_page(
    visits: Iterable[Visit],
    nonce: str,
    *,
    q: str = "",
    version: str = "",
    dimension_names: Mapping[int, str] | None = None,
    hits_kept: int = 0,
    hits_evicted: int = 0,
    hits_limit: int = 0,
    visits_limit: int | None = None,
) -> str:
    """The whole page, with `visits` (newest first) already in it.

    `version` is the ETag of that list: the script asks for a new one only when
    the collector's version differs.
    """
    listing = render_visits(
        list(visits),
        q=q,
        dimension_names=dimension_names,
        hits_kept=hits_kept,
        hits_evicted=hits_evicted,
        hits_limit=hits_limit,
        visits_limit=visits_limit,
    )
    script = SCRIPT.replace("REFRESH_MS", str(REFRESH_MS))
    nonce = escape(nonce)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asgi-matomo collector</title>
<style nonce="{nonce}">{STYLE}</style>
</head>
<body>
<header class="top">
<h1>Visits log <span class="product">asgi-matomo collector</span></h1>
<input id="filter" type="search" value="{escape(q)}" autocomplete="off"
 placeholder="Filter: URL, title, IP, any text" aria-label="Filter visits">
<span id="state">live</span>
</header>
<main id="visits" data-version="{escape(version)}">
{listing}
</main>
<script nonce="{nonce}">{script}</script>
</body>
</html>
"""
