"""The visits log's HTML, rendered from visits directly (the browser test shows it live)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from asgi_matomo._collector import StoredHit, _useragent
from asgi_matomo._collector._page import action_status, render_page, render_visits
from asgi_matomo._collector._visits import group_visits
from tests.test_visits import FIREFOX, hit


def render(*hits: StoredHit, names: dict[int, str] | None = None, q: str = "") -> str:
    return render_visits(group_visits(hits), q=q, dimension_names=names)


def test_visitor_details() -> None:
    html = render(
        hit(1, 0, cip="203.0.113.7", urlref="https://search.test/?q=a", cid="0123456789abcdef")
    )
    assert '<span class="id">0123456789abcdef</span> <span class="note">from cid</span>' in html
    assert '<dt>IP</dt><dd><span class="wrap">203.0.113.7</span></dd>' in html
    assert "<dt>Browser</dt><dd>Firefox 128.0</dd><dt>OS</dt><dd>Linux</dd>" in html
    assert '<dt>Language</dt><dd><span class="wrap">en</span></dd>' in html
    assert '<dt>Referrer</dt><dd><span class="wrap">https://search.test/?q=a</span></dd>' in html
    assert "User ID" not in html


def test_visitor_without_ids_ip_or_headers() -> None:
    html = render(hit(1, 0, ip="127.0.0.1", ua=None, lang=None))
    assert "no id sent: grouped by browser, IP and language" in html
    assert 'no IP sent <span class="note">(the sender\'s: 127.0.0.1)</span>' in html
    assert '<dt>User agent</dt><dd><span class="wrap">none sent</span></dd>' in html
    assert '<dt>Language</dt><dd><span class="wrap">none sent</span></dd>' in html
    assert "none (direct entry)" in html


def test_user_agent_text_without_ua_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_useragent, "_parser", lambda: None)
    _useragent._describe.cache_clear()
    try:
        html = render(hit(1, 0))
    finally:
        _useragent._describe.cache_clear()
    assert f'<dt>User agent</dt><dd><span class="wrap">{FIREFOX}</span></dd>' in html
    assert "<dt>Browser</dt>" not in html


def test_unrecognised_browser_shows_the_text() -> None:
    html = render(hit(1, 0, ua="python-httpx/0.27.0"))
    assert '<dt>User agent</dt><dd><span class="wrap">python-httpx/0.27.0</span></dd>' in html


def test_partly_recognised_user_agent() -> None:
    html = render(hit(1, 0, ua="Mozilla/5.0 (Windows NT 10.0; Win64; x64)"))
    assert "<dt>Browser</dt><dd>unknown</dd><dt>OS</dt><dd>Windows 10</dd>" in html


def test_uid_and_visit_variables() -> None:
    first = replace(hit(1, 0, uid="alice"), cvar_visit={"1": ["tier", "gold"]})
    html = render(first)
    assert '<dt>User ID</dt><dd><span class="wrap">alice</span></dd>' in html
    assert "from uid" in html
    assert (
        '<dt>Visit variable</dt><dd><span class="wrap">tier</span> <span class="wrap">gold</span>'
        in html
    )


def test_action_lines() -> None:
    page = replace(
        hit(1, 0, action_name="Shop", url="https://a.test/shop"),
        pf_srv=12,
        cvar={"1": ["http_method", "GET"]},
        dimensions={"3": "301", "5": "blue"},
    )
    html = render(page, names={3: "HTTP_status_code"})
    assert "<time>09:00:00</time>" in html
    assert '<span class="type type-pageview">page view</span>' in html
    assert '<span class="title wrap">Shop</span>' in html
    assert '<span class="status status-redirect" title="HTTP status">301</span>' in html
    assert '<span class="timing" title="server time (pf_srv)">12 ms</span>' in html
    assert '<div class="url wrap">https://a.test/shop</div>' in html
    assert '<span class="name wrap">http_method</span> <span class="value wrap">GET</span>' in html
    assert (
        '<span class="name wrap">HTTP_status_code</span> <span class="dim">dimension3</span>'
        in html
    )
    assert '<span class="name">dimension5</span> <span class="value wrap">blue</span>' in html
    assert '<details data-key="p1"><summary>4 raw parameters</summary>' in html
    assert '<dt class="wrap">idsite</dt><dd class="wrap">1</dd>' in html


def test_untitled_page_view_event_search_download() -> None:
    untitled = hit(1, 0, url="https://a.test/")
    event = replace(hit(2, 1), hit_type="event", e_c="Video", e_a="Play", e_n=None, e_v=None)
    search = replace(
        hit(3, 2), hit_type="search", search="shoes", search_cat="shop", search_count=1
    )
    bare_search = replace(hit(4, 3), hit_type="search", search="hats")
    download = replace(hit(5, 4), hit_type="download", url="https://a.test/f.pdf")
    html = render(untitled, event, search, bare_search, download)
    assert '<span class="title untitled">no title</span>' in html
    assert '<span class="wrap">Video / Play</span></div>' in html
    assert '<span class="title wrap">shoes (category shop, 1 result)</span>' in html
    assert '<span class="title wrap">hats</span>' in html
    assert '<span class="type type-download">download</span>  ' in html
    assert "1 visit, 5 actions, newest visit first" in html


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59, "59 s"), (95, "1 min 35 s"), (1799, "29 min 59 s")],
)
def test_visit_duration(seconds: float, text: str) -> None:
    html = render(hit(1, 0), hit(2, seconds))
    assert f"2 actions · {text} · site 1" in html


def test_long_visit_duration_in_hours() -> None:
    hits = [hit(n, n * 1200.0) for n in range(1, 5)]
    assert "4 actions · 1 h 0 min · site 1" in render(*hits)


@pytest.mark.parametrize(
    ("dimensions", "names", "status"),
    [
        ({"3": "404"}, {3: "http_status_code"}, 404),
        ({"3": "404"}, {3: " HTTP_Status "}, 404),
        ({"3": "404"}, {}, None),
        ({"3": "n/a"}, {3: "http_status_code"}, None),
        ({"3": "٤٠٤"}, {3: "http_status_code"}, None),
    ],
)
def test_action_status_from_a_named_dimension(
    dimensions: dict[str, str], names: dict[int, str], status: int | None
) -> None:
    assert action_status(replace(hit(1), dimensions=dimensions), names) == status


def test_action_status_from_custom_variables_first() -> None:
    page = replace(hit(1), http_status=500, dimensions={"3": "404"})
    assert action_status(page, {3: "http_status_code"}) == 500


def test_filter_and_empty_states() -> None:
    assert "No hit yet" in render_visits([])
    assert "No visit matches the filter." in render_visits([], q="x")
    assert "matching “&lt;b&gt;”" in render(hit(1), q="<b>")


def test_page_keeps_the_filter_and_nonce() -> None:
    html = render_page([], 'n"1', q='"><b>')
    assert 'value="&quot;&gt;&lt;b&gt;"' in html
    assert '<script nonce="n&quot;1">' in html


def test_campaign_and_referrer() -> None:
    html = render(hit(1, 0, url="https://a.test/?utm_campaign=Spring&utm_term=<b>"))
    assert (
        '<dt>Campaign</dt><dd><span class="wrap">spring</span> <span class="note">keyword</span>'
        ' <span class="wrap">&lt;b&gt;</span></dd>'
    ) in html
    assert "<dt>Referrer</dt>" not in html
    html = render(hit(1, 0, url="https://a.test/?utm_campaign=x", urlref="https://mail.test/"))
    assert '<dt>Campaign</dt><dd><span class="wrap">x</span></dd>' in html
    assert '<dt>Referrer</dt><dd><span class="wrap">https://mail.test/</span></dd>' in html


def test_long_values_are_cut() -> None:
    html = render(hit(1, 0, ua="x" * 5000, note="y" * 2500))
    assert f'<span class="wrap">{"x" * 2000}… (3000 more characters)</span>' in html
    assert f'<dd class="wrap">{"y" * 2000}… (500 more characters)</dd>' in html
