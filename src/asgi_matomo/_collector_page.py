"""The collector's live page: one self-contained HTML document, no external asset.

Hits carry attacker-controlled text (URLs, titles, user agents): the server
escapes every value it renders and the script only ever sets `textContent`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

__all__ = ["cells", "render_page"]

REFRESH_MS = 1000
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

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
#toolbar { display: flex; gap: 1rem; align-items: center; margin-bottom: .8rem; }
#filter { padding: .3rem .5rem; width: 24rem; }
#state { color: #666; }
#state.offline { color: #b00; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .5rem; text-align: left;
  vertical-align: top; word-break: break-all; }
th { background: #f4f4f4; position: sticky; top: 0; }
tr.hit td.status-error { color: #b00; font-weight: bold; }
"""

# Builds the same cells as `cells()` below, with textContent only.
_SCRIPT = """
"use strict";
const body = document.getElementById("hits-body");
const filter = document.getElementById("filter");
const state = document.getElementById("state");
const count = document.getElementById("count");
let generation = 0;

function text(value) { return value === null || value === undefined ? "" : String(value); }

function cells(hit) {
  const event = [hit.e_c, hit.e_a, hit.e_n, hit.e_v].filter((v) => v !== null).join(" / ");
  const cvar = Object.values(hit.cvar || {}).map((p) => p[0] + "=" + p[1]).join(", ");
  return [hit.time_iso, hit.hit_type, text(hit.action_name || hit.search), text(hit.url),
          text(hit.http_status), text(hit.pf_srv), event, cvar, hit.visitor_ip];
}

function row(hit) {
  const tr = document.createElement("tr");
  tr.className = "hit";
  tr.dataset.id = String(hit.id);
  cells(hit).forEach((value, index) => {
    const td = document.createElement("td");
    td.textContent = value;
    if (index === 4 && hit.http_status >= 400) { td.className = "status-error"; }
    tr.appendChild(td);
  });
  return tr;
}

async function refresh() {
  const mine = ++generation;
  try {
    const response = await fetch("/api/hits?limit=200&q=" + encodeURIComponent(filter.value));
    if (!response.ok) { throw new Error("HTTP " + response.status); }
    const hits = await response.json();
    if (mine !== generation) { return; }
    body.replaceChildren(...hits.map(row));
    count.textContent = String(hits.length);
    state.textContent = "live";
    state.className = "";
  } catch (error) {
    state.textContent = "collector unreachable (" + error.message + ")";
    state.className = "offline";
  }
}

filter.addEventListener("input", refresh);
setInterval(refresh, REFRESH_MS);
"""


def cells(hit: Mapping[str, Any]) -> list[str]:
    """The text of each column for one hit (as `StoredHit.to_json()` gives it)."""

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


def _row(hit: Mapping[str, Any]) -> str:
    status = hit["http_status"]
    tds = []
    for index, value in enumerate(cells(hit)):
        error = index == 4 and isinstance(status, int) and status >= 400
        attr = ' class="status-error"' if error else ""
        tds.append(f"<td{attr}>{escape(value)}</td>")
    return f'<tr class="hit" data-id="{int(hit["id"])}">{"".join(tds)}</tr>'


def render_page(hits: Sequence[Mapping[str, Any]], nonce: str) -> str:
    """The whole page, with `hits` (newest first) already in the table."""
    head = "".join(f"<th>{escape(name)}</th>" for name in COLUMNS)
    rows = "\n".join(_row(hit) for hit in hits)
    script = _SCRIPT.replace("REFRESH_MS", str(REFRESH_MS))
    nonce = escape(nonce)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asgi-matomo collector</title>
<style nonce="{nonce}">{_STYLE}</style>
</head>
<body>
<h1>asgi-matomo collector: hits received</h1>
<div id="toolbar">
<input id="filter" type="search" placeholder="Filter on URL or action" autocomplete="off">
<span><span id="count">{len(hits)}</span> hits shown</span>
<span id="state">live</span>
</div>
<table id="hits">
<thead><tr>{head}</tr></thead>
<tbody id="hits-body">
{rows}
</tbody>
</table>
<script nonce="{nonce}">{script}</script>
</body>
</html>
"""
