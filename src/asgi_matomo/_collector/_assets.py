"""The style and script of the collector's visits log (`_page`), inline in it.

The page has no external asset: its Content-Security-Policy allows only these two,
by nonce. The layout wraps at spaces; only `.wrap` (URLs and values) may break
inside a word, when one is wider than its box; below 760 px the visitor's details
stack above the actions.
"""

from __future__ import annotations

__all__ = ["REFRESH_MS", "SCRIPT", "STYLE"]

REFRESH_MS = 1000

STYLE = """
:root { --ink: #1d2430; --muted: #5b6675; --line: #e1e5ec; --bg: #f3f5f8;
  --accent: #2f4fa8; --ok: #17713a; --warn: #8a5a00; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: var(--bg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
.top { position: sticky; top: 0; z-index: 1; background: #fff;
  border-bottom: 1px solid var(--line); padding: .7rem 1.5rem;
  display: flex; flex-wrap: wrap; align-items: center; gap: .5rem 1.25rem; }
h1 { font-size: 1.15rem; margin: 0; }
h1 .product { color: var(--muted); font-weight: normal; font-size: .9rem; }
#filter { flex: 1 1 14rem; max-width: 30rem; padding: .4rem .6rem; font: inherit;
  border: 1px solid #c3cad6; border-radius: 6px; }
#state { font-size: .85rem; color: var(--ok); }
#state::before { content: "\\25CF  "; }
#state.offline { color: var(--bad); }
main { padding: 1rem 1.5rem 2rem; max-width: 96rem; }
.summary { color: var(--muted); margin: 0 0 .8rem; }
.empty { background: #fff; border: 1px dashed #c3cad6; border-radius: 8px; padding: 1rem; }
.visit { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  margin: 0 0 1rem; overflow: hidden; }
.visit-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: .2rem 1rem;
  padding: .55rem 1rem; background: #f8f9fb; border-bottom: 1px solid var(--line); }
.visit-head h2 { font-size: 1rem; margin: 0; }
.visit-head .facts { color: var(--muted); font-size: .9rem; }
.visit-body { display: grid; grid-template-columns: minmax(15rem, 22rem) minmax(0, 1fr); }
.visitor { margin: 0; padding: .7rem 1rem; border-right: 1px solid var(--line);
  display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .25rem .8rem;
  align-content: start; font-size: .92rem; }
.visitor dt { color: var(--muted); }
.visitor dd { margin: 0; min-width: 0; }
.note { color: var(--muted); font-size: .85rem; }
.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .88rem; }
.actions { list-style: none; margin: 0; padding: 0; min-width: 0; }
.action { padding: .6rem 1rem; border-bottom: 1px solid var(--line); }
.action:last-child { border-bottom: 0; }
.action-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: .15rem .6rem; }
.action-head time { color: var(--muted); font-variant-numeric: tabular-nums; }
.type { font-size: .75rem; text-transform: uppercase; letter-spacing: .03em;
  color: var(--muted); border: 1px solid var(--line); border-radius: 4px; padding: 0 .35rem; }
.type-event { color: #6b3fa0; border-color: #d9c9ee; }
.title { font-weight: 600; }
.untitled { color: var(--muted); font-style: italic; font-weight: normal; }
.status { font-weight: 600; font-variant-numeric: tabular-nums; color: var(--ok); }
.status-redirect { color: var(--warn); }
.status-error { color: var(--bad); }
.timing { color: var(--muted); font-size: .9rem; }
.url { color: var(--accent); font-size: .9rem; margin-top: .1rem; }
.event { margin-top: .2rem; }
.label { color: var(--muted); font-size: .85rem; }
.vars { list-style: none; margin: .35rem 0 0; padding: 0; display: flex; flex-wrap: wrap;
  gap: .3rem; }
.vars li { min-width: 0; background: #f1f3f7; border-radius: 4px; padding: .05rem .45rem;
  font-size: .85rem; }
.vars .name { color: var(--muted); }
.vars .dim { color: var(--muted); font-size: .75rem; }
details { margin-top: .35rem; font-size: .85rem; }
summary { cursor: pointer; color: var(--muted); }
.params { display: grid; grid-template-columns: fit-content(40%) minmax(0, 1fr);
  gap: .1rem .8rem; margin: .3rem 0 0; padding: .4rem .6rem; background: #f8f9fb;
  border-radius: 4px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.params dt { color: var(--muted); }
.params dd { margin: 0; min-width: 0; }
.wrap { overflow-wrap: anywhere; }
@media (max-width: 760px) {
  .top { padding: .6rem .75rem; }
  main { padding: .75rem .75rem 1.5rem; }
  .visit-body { grid-template-columns: minmax(0, 1fr); }
  .visitor { border-right: 0; border-bottom: 1px solid var(--line); }
  .action { padding: .55rem .75rem; }
}
"""

# Swaps in what the server renders, when it changed; a <details> left open stays open.
SCRIPT = """
"use strict";
const list = document.getElementById("visits");
const filter = document.getElementById("filter");
const state = document.getElementById("state");
let version = list.dataset.version;
let generation = 0;

async function refresh() {
  const mine = ++generation;
  try {
    const query = encodeURIComponent(filter.value);
    const response = await fetch("/visits.html?q=" + query,
                                 {cache: "no-store", headers: {"If-None-Match": version}});
    if (response.status !== 304 && !response.ok) { throw new Error("HTTP " + response.status); }
    const html = response.status === 304 ? null : await response.text();
    if (mine !== generation) { return; }
    if (html !== null) {
      const open = new Set(Array.from(list.querySelectorAll("details[open]"),
                                      (d) => d.dataset.key));
      const parsed = new DOMParser().parseFromString(html, "text/html");
      parsed.querySelectorAll("details").forEach((d) => {
        if (open.has(d.dataset.key)) { d.open = true; }
      });
      list.replaceChildren(...Array.from(parsed.body.childNodes));
      version = response.headers.get("ETag");
    }
    state.textContent = "live";
    state.className = "";
  } catch (error) {
    state.textContent = "collector unreachable (" + error.message + ")";
    state.className = "offline";
  }
}

filter.addEventListener("input", () => {
  // The filter is in the address too: a reload or a shared link keeps it.
  const url = new URL(window.location.href);
  if (filter.value) { url.searchParams.set("q", filter.value); }
  else { url.searchParams.delete("q"); }
  window.history.replaceState(null, "", url);
  refresh();
});
setInterval(refresh, REFRESH_MS);
"""
