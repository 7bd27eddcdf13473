"""The pure core: one request in, the exact Matomo parameters out."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_matomo._core import build_hits
from asgi_matomo._encoding import encode_query, quote_value
from asgi_matomo._overrides import (
    MAX_ACTION_NAME_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_URL_LENGTH,
    param_value,
    performance_value,
)
from asgi_matomo._request import RequestInfo, TrackingConfig, inspect_request
from asgi_matomo._routes import route_template
from tests.helpers import config, http_scope, params_of

STARTED = 1_700_000_000.75


def info_of(scope: dict[str, Any], cfg: TrackingConfig | None = None) -> RequestInfo:
    info = inspect_request(cfg or config(), scope, STARTED)
    assert info is not None
    return info


def hits_for(
    scope: dict[str, Any] | None = None,
    *,
    cfg: TrackingConfig | None = None,
    status: int = 200,
    elapsed_ms: float | None = 12.4,
    template: str | None = None,
    overrides: dict[Any, Any] | None = None,
) -> list[dict[str, str]]:
    cfg = cfg or config()
    info = info_of(scope or http_scope("/foo"), cfg)
    hits = build_hits(
        cfg,
        info,
        status=status,
        elapsed_ms=elapsed_ms,
        template=template,
        overrides=overrides,
        rand=lambda: 4242,
    )
    return [params_of(hit) for hit in hits]


def test_a_page_view_carries_exactly_what_matomo_needs() -> None:
    scope = http_scope(
        "/foo",
        query=b"q=1&lang=sv",
        headers=[
            (b"host", b"api.example.org"),
            (b"user-agent", b"Mozilla/5.0 (X11; Linux)"),
            (b"accept-language", b"sv-SE,sv;q=0.9"),
            (b"referer", b"https://search.example/?q=foo"),
        ],
    )
    (hit,) = hits_for(scope, elapsed_ms=201.4)
    assert hit == {
        "idsite": "1",
        "rec": "1",
        "apiv": "1",
        "rand": "4242",
        "url": "https://api.example.org/foo?q=1&lang=sv",
        "action_name": "/foo",
        "ua": "Mozilla/5.0 (X11; Linux)",
        "lang": "sv-SE,sv;q=0.9",
        "urlref": "https://search.example/?q=foo",
        "pf_srv": "201",
        "cvar": '{"1":["http_status_code","200"],"2":["http_method","GET"]}',
        "cdt": "1700000000",
    }


def test_no_gt_ms_no_token_and_no_cip_without_an_access_token() -> None:
    (hit,) = hits_for()
    assert "gt_ms" not in hit
    assert "token_auth" not in hit
    assert "cip" not in hit
    assert "send_image" not in hit  # bulk elements: Matomo answers the batch as a whole


def test_cvar_is_in_matomo_slot_format() -> None:
    (hit,) = hits_for(status=404, overrides={"cvar": {"anything": "goes", "n": 3}})
    assert json.loads(hit["cvar"]) == {
        "1": ["http_status_code", "404"],
        "2": ["http_method", "GET"],
        "3": ["anything", "goes"],
        "4": ["n", "3"],
    }


def test_cvar_beyond_five_slots_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    overrides = {"cvar": {f"v{i}": i for i in range(6)}}
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        (hit,) = hits_for(overrides=overrides)
    slots = json.loads(hit["cvar"])
    assert sorted(slots) == ["1", "2", "3", "4", "5"]
    assert slots["5"] == ["v2", "2"]
    assert "custom variable" in caplog.text


def test_custom_variable_names_can_map_to_custom_dimensions() -> None:
    cfg = config(custom_dimensions={"http_status_code": 1, "http_method": 2, "plan": 7})
    (hit,) = hits_for(cfg=cfg, status=201, overrides={"cvar": {"plan": "pro", "other": "x"}})
    assert hit["dimension1"] == "201"
    assert hit["dimension2"] == "GET"
    assert hit["dimension7"] == "pro"
    assert json.loads(hit["cvar"]) == {"1": ["other", "x"]}


def test_all_custom_variables_mapped_means_no_cvar() -> None:
    cfg = config(custom_dimensions={"http_status_code": 1, "http_method": 2})
    (hit,) = hits_for(cfg=cfg)
    assert "cvar" not in hit


def test_long_custom_variables_are_clipped_to_matomo_limits() -> None:
    (hit,) = hits_for(overrides={"cvar": {"n" * 300: "v" * 300}})
    name, value = json.loads(hit["cvar"])["3"]
    assert (len(name), len(value)) == (200, 200)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.2, "0"), (201.4, "201"), (201.5, "202"), (16_777_215, "16777215")],
)
def test_pf_srv_is_whole_milliseconds(elapsed: float, expected: str) -> None:
    (hit,) = hits_for(elapsed_ms=elapsed)
    assert hit["pf_srv"] == expected


@pytest.mark.parametrize("elapsed", [16_777_216.0, -1.0, None])
def test_pf_srv_matomo_would_drop_is_not_sent(elapsed: float | None) -> None:
    (hit,) = hits_for(elapsed_ms=elapsed)
    assert "pf_srv" not in hit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, "5"),
        (5.6, "6"),
        ("7", "7"),
        ("7.2", "7"),
        ("x", None),
        (True, None),
        (float("nan"), None),
        (-3, None),
        (None, None),
        ([1], None),
    ],
)
def test_performance_values(value: object, expected: str | None) -> None:
    assert performance_value(value) == expected


def test_perf_tracker_value_overrides_server_time() -> None:
    (hit,) = hits_for(elapsed_ms=900, overrides={"pf_srv": 200})
    assert hit["pf_srv"] == "200"


def test_invalid_pf_override_removes_the_parameter() -> None:
    (hit,) = hits_for(elapsed_ms=900, overrides={"pf_srv": -5})
    assert "pf_srv" not in hit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", "a"),
        (3, "3"),
        (2.5, "2.5"),
        (True, "1"),
        (False, "0"),
        (None, None),
        ({"k": "é"}, '{"k":"é"}'),
        (["a", 1], '["a",1]'),
        (SimpleNamespace(), "namespace()"),
    ],
)
def test_override_values_become_parameters(value: object, expected: str | None) -> None:
    assert param_value(value) == expected


def test_request_overrides_set_any_parameter() -> None:
    (hit,) = hits_for(
        overrides={"action_name": "Foo/foo", "uid": "user-7", "dimension3": "x", "url": None}
    )
    assert hit["action_name"] == "Foo/foo"
    assert hit["uid"] == "user-7"
    assert hit["dimension3"] == "x"
    assert "url" not in hit  # None removes a default parameter


def test_reserved_overrides_never_reach_the_query() -> None:
    (hit,) = hits_for(overrides={"token_auth": "secret", "idsite": 99, "rec": 0, 7: "x"})
    assert hit["idsite"] == "1"
    assert hit["rec"] == "1"
    assert "token_auth" not in hit


def test_cip_and_cdt_overrides_feed_the_hit_fields() -> None:
    cfg = config(track_visitor_ip=True)
    (hit,) = hits_for(cfg=cfg, overrides={"cip": "198.51.100.9", "cdt": 1_600_000_000})
    assert hit["cip"] == "198.51.100.9"
    assert hit["cdt"] == "1600000000"


@pytest.mark.parametrize(
    ("cdt", "expected"),
    [("1600000000.5", "1600000000"), ("soon", "1700000000"), (True, "1700000000")],
)
def test_cdt_override_parsing(cdt: object, expected: str) -> None:
    (hit,) = hits_for(overrides={"cdt": cdt})
    assert hit["cdt"] == expected


def test_cip_is_sent_only_when_visitor_ip_tracking_is_on() -> None:
    (with_token,) = hits_for(cfg=config(track_visitor_ip=True))
    assert with_token["cip"] == "203.0.113.7"
    (without,) = hits_for(cfg=config(), overrides={"cip": "198.51.100.9"})
    assert "cip" not in without


def test_event_overrides_send_a_page_view_and_an_event() -> None:
    page, event = hits_for(
        elapsed_ms=55,
        overrides={
            "action_name": "Foo/foo",
            "e_c": "Foo",
            "e_a": "Playing",
            "e_n": "song",
            "e_v": 3,
            "uid": "u1",
            "new_visit": 1,
        },
    )
    assert page["action_name"] == "Foo/foo"
    assert page["pf_srv"] == "55"
    assert page["new_visit"] == "1"
    assert not {"e_c", "e_a", "e_n", "e_v", "ca"} & page.keys()
    assert event["e_c"] == "Foo"
    assert event["e_a"] == "Playing"
    assert event["e_n"] == "song"
    assert event["e_v"] == "3"
    assert event["ca"] == "1"
    assert event["uid"] == "u1"
    assert event["url"] == page["url"]
    assert event["cdt"] == page["cdt"]
    assert not {"action_name", "pf_srv", "cvar", "new_visit"} & event.keys()


def test_event_without_action_sends_only_the_page_view(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        hits = hits_for(overrides={"e_c": "Only-a-category"})
    assert len(hits) == 1
    assert "e_c" not in hits[0]
    assert "no action" in caplog.text


def test_event_action_without_category_is_not_an_event() -> None:
    hits = hits_for(overrides={"e_a": "Playing"})
    assert len(hits) == 1
    assert "e_a" not in hits[0]


def test_route_details_by_path_and_request_overrides_win() -> None:
    cfg = config(route_details={"/foo": {"action_name": "Foo/foo", "dimension1": "a"}})
    (hit,) = hits_for(cfg=cfg, overrides={"dimension1": "b"})
    assert hit["action_name"] == "Foo/foo"
    assert hit["dimension1"] == "b"


def test_route_details_by_template() -> None:
    cfg = config(route_details={"/users/{id}": {"action_name": "Users/show"}})
    (hit,) = hits_for(http_scope("/users/42"), cfg=cfg, template="/users/{id}")
    assert hit["action_name"] == "Users/show"


def test_route_details_cvar_merges() -> None:
    cfg = config(route_details={"/foo": {"cvar": {"team": "a"}}})
    (hit,) = hits_for(cfg=cfg)
    assert json.loads(hit["cvar"])["3"] == ["team", "a"]


def test_route_details_path_below_root_path() -> None:
    cfg = config(route_details={"/foo": {"action_name": "Foo"}})
    scope = http_scope("/api/foo", root_path="/api")
    (hit,) = hits_for(scope, cfg=cfg)
    assert hit["action_name"] == "Foo"


def test_action_name_from_route_template_when_asked() -> None:
    cfg = config(action_name_from_route=True)
    (hit,) = hits_for(http_scope("/users/42"), cfg=cfg, template="/users/{id}")
    assert hit["action_name"] == "/users/{id}"
    assert hit["url"] == "https://example.org/users/42"
    (fallback,) = hits_for(http_scope("/users/42"), cfg=cfg, template=None)
    assert fallback["action_name"] == "/users/42"


def test_long_url_and_action_name_are_clipped() -> None:
    scope = http_scope("/" + "a" * 2000, query=b"x=" + b"%C3%A9" * 400)
    (hit,) = hits_for(scope, overrides={"action_name": "n" * 3000})
    assert len(hit["url"]) <= MAX_URL_LENGTH
    assert len(hit["action_name"]) == MAX_ACTION_NAME_LENGTH


def test_clipped_url_never_ends_in_half_an_escape() -> None:
    for pad in range(5):
        scope = http_scope("/" + "a" * (1000 + pad), query=b"x=" + b"%C3%A9" * 20)
        info = info_of(scope)
        assert len(info.url) <= MAX_URL_LENGTH
        assert "%" not in info.url[-2:]


# --- inspect_request: the URL ---------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "url"),
    [
        (http_scope("/foo"), "https://example.org/foo"),
        (http_scope("/foo", query=b"a=1&b=%20"), "https://example.org/foo?a=1&b=%20"),
        # uvicorn puts root_path into path and raw_path; hypercorn does not.
        (
            http_scope("/api/foo", root_path="/api", raw_path=b"/api/foo"),
            "https://example.org/api/foo",
        ),
        (http_scope("/foo", root_path="/api", raw_path=b"/foo"), "https://example.org/api/foo"),
        (http_scope("/foo", root_path="/api"), "https://example.org/api/foo"),
        (http_scope("/apiary", root_path="/api"), "https://example.org/api/apiary"),
        (http_scope("/caf\u00e9 x"), "https://example.org/caf%C3%A9%20x"),
        (http_scope("/caf\u00e9", raw_path=b"/caf%C3%A9"), "https://example.org/caf%C3%A9"),
        (http_scope("/a", raw_path=b"/a?x=1"), "https://example.org/a"),
        (http_scope(""), "https://example.org/"),
    ],
)
def test_url_path_appears_exactly_once(scope: dict[str, Any], url: str) -> None:
    assert info_of(scope).url == url


@pytest.mark.parametrize(
    ("headers", "server", "host"),
    [
        ([(b"host", b"Example.ORG:8443")], ("10.0.0.1", 80), "example.org:8443"),
        ([], ("10.0.0.1", 8000), "10.0.0.1:8000"),
        ([], ("10.0.0.1", 443), "10.0.0.1"),
        ([], ("::1", 8000), "[::1]:8000"),
        ([], ("unix.sock", None), "unix.sock"),
        ([], None, "localhost"),
        ([(b"host", b"evil.example/<script>")], ("10.0.0.1", 80), "10.0.0.1"),
        ([(b"host", b"[2001:db8::1]:8080")], None, "[2001:db8::1]:8080"),
    ],
)
def test_host_comes_from_the_host_header_then_the_server(
    headers: list[tuple[bytes, bytes]], server: tuple[str, int | None] | None, host: str
) -> None:
    scope = http_scope("/", headers=headers, server=server)
    assert info_of(scope).url == f"https://{host}/"


@pytest.mark.parametrize(
    ("scheme", "expected"), [("http", "http"), ("https", "https"), ("wss", "https"), (None, "http")]
)
def test_scheme_from_the_scope_unless_assume_https(scheme: str | None, expected: str) -> None:
    scope = http_scope("/")
    scope["scheme"] = scheme
    assert info_of(scope, config(assume_https=False)).url == f"{expected}://example.org/"
    assert info_of(scope, config(assume_https=True)).url == "https://example.org/"


def test_headers_are_decoded_as_text_whatever_their_bytes() -> None:
    scope = http_scope(
        "/",
        headers=[
            (b"host", b"example.org"),
            (b"user-agent", "Bötchen/1.0".encode()),
            (b"accept-language", b"fr-CH, fr;q=0.9"),
            (b"referer", b"https://ex.example/\xe9t\xe9"),  # Latin-1, not UTF-8
        ],
    )
    info = info_of(scope)
    assert info.user_agent == "Bötchen/1.0"
    assert info.language == "fr-CH, fr;q=0.9"
    assert info.referrer == "https://ex.example/été"


def test_first_of_duplicated_headers_wins_and_giant_ones_are_bounded() -> None:
    scope = http_scope(
        "/",
        headers=[
            (b"host", b"example.org"),
            (b"User-Agent", b"first"),
            (b"user-agent", b"second"),
            (b"referer", b"r" * 100_000),
            ("accept-language", "sv"),  # type: ignore[list-item]
            (b"x-other", b"ignored"),
            (b"broken",),  # type: ignore[list-item]
            (1, b"x"),  # type: ignore[list-item]
            (b"user-agent", 5),  # type: ignore[list-item]
        ],
    )
    info = info_of(scope)
    assert info.user_agent == "first"
    assert info.language == "sv"
    assert info.referrer is not None
    assert len(info.referrer) == MAX_TEXT_LENGTH


def test_odd_scopes_do_not_crash() -> None:
    scope: dict[str, Any] = {"type": "http"}
    info = info_of(scope)
    assert info.url == "https://localhost/"
    assert info.method == "GET"
    assert info.visitor_ip is None
    scope = {"type": "http", "headers": None, "client": None, "server": ["x"], "path": 5}
    assert info_of(scope).url == "https://localhost/"
    scope = {"type": "http", "server": (None, 80), "client": (None, 1)}
    assert info_of(scope).url == "https://localhost/"


# --- inspect_request: what is not tracked ----------------------------------------


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan", None])
def test_only_http_is_tracked(scope_type: str | None) -> None:
    scope = http_scope("/")
    scope["type"] = scope_type
    assert inspect_request(config(), scope, STARTED) is None


@pytest.mark.parametrize(
    ("options", "path", "excluded"),
    [
        ({"exclude_paths": ["/health"]}, "/health", True),
        ({"exclude_paths": ["/health"]}, "/healthz", False),
        ({"exclude_patterns": [r"^/static/"]}, "/static/app.js", True),
        ({"exclude_patterns": [r"^/static/"]}, "/api/static/", False),
    ],
)
def test_path_exclusions(options: dict[str, Any], path: str, excluded: bool) -> None:
    result = inspect_request(config(**options), http_scope(path), STARTED)
    assert (result is None) is excluded


def test_exclusions_match_below_a_root_path_too() -> None:
    cfg = config(exclude_paths=["/health"])
    assert inspect_request(cfg, http_scope("/api/health", root_path="/api"), STARTED) is None


@pytest.mark.parametrize(
    ("allowed", "ignored", "method", "tracked"),
    [
        ("all-methods", None, "OPTIONS", True),
        (["get", "POST"], None, "post", True),
        (["GET"], None, "DELETE", False),
        ("all-methods", ["options"], "OPTIONS", False),
        (["GET"], ["GET"], "GET", False),
    ],
)
def test_method_filters(allowed: Any, ignored: Any, method: str, tracked: bool) -> None:
    cfg = config(allowed_methods=allowed, ignored_methods=ignored)
    result = inspect_request(cfg, http_scope("/", method=method), STARTED)
    assert (result is not None) is tracked


def test_ignored_user_agents() -> None:
    cfg = config(ignored_user_agents=[r"kube-probe/", r"(?i)bot\b"])
    for agent, tracked in [(b"kube-probe/1.29", False), (b"SomeBot", False), (b"Mozilla", True)]:
        scope = http_scope("/", headers=[(b"user-agent", agent)])
        assert (inspect_request(cfg, scope, STARTED) is not None) is tracked


# --- visitor IP and proxies -------------------------------------------------------

PROXY = ("10.0.0.2", 40000)


def visitor(
    headers: list[tuple[bytes, bytes]], *, client: Any = PROXY, **options: Any
) -> str | None:
    cfg = config(track_visitor_ip=True, **options)
    return info_of(http_scope("/", headers=headers, client=client), cfg).visitor_ip


def test_without_trusted_proxies_spoofed_headers_change_nothing() -> None:
    spoof = [(b"x-forwarded-for", b"1.2.3.4"), (b"forwarded", b"for=5.6.7.8")]
    assert visitor(spoof) == "10.0.0.2"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    spoof = [(b"x-forwarded-for", b"1.2.3.4")]
    assert (
        visitor(spoof, client=("198.51.100.1", 1), trusted_proxies=["10.0.0.0/8"]) == "198.51.100.1"
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-forwarded-for", b"198.51.100.23")], "198.51.100.23"),
        ([(b"x-forwarded-for", b"1.2.3.4, 198.51.100.23, 10.0.0.9")], "198.51.100.23"),
        (
            [(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-for", b"198.51.100.23")],
            "198.51.100.23",
        ),
        ([(b"x-forwarded-for", b"10.0.0.7, 10.0.0.9")], "10.0.0.7"),
        ([(b"x-forwarded-for", b"garbage, 198.51.100.23:4711")], "198.51.100.23"),
        ([(b"x-forwarded-for", b"unknown")], "10.0.0.2"),
        ([], "10.0.0.2"),
        # The proxy writes X-Forwarded-For: a Forwarded header is the visitor's own.
        ([(b"forwarded", b"for=6.6.6.6"), (b"x-forwarded-for", b"198.51.100.9")], "198.51.100.9"),
        ([(b"forwarded", b"for=6.6.6.6")], "10.0.0.2"),
    ],
)
def test_trusted_proxy_headers_give_the_visitor(
    headers: list[tuple[bytes, bytes]], expected: str
) -> None:
    assert visitor(headers, trusted_proxies=["10.0.0.0/8"]) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"forwarded", b"for=192.0.2.60;proto=https;by=10.0.0.2")], "192.0.2.60"),
        ([(b"forwarded", b'for="[2001:db8:cafe::17]:4711", for=10.0.0.9')], "2001:db8:cafe::17"),
        ([(b"forwarded", b"for=_hidden, for=198.51.100.5")], "198.51.100.5"),
        ([(b"forwarded", b"proto=https")], "10.0.0.2"),
        ([], "10.0.0.2"),
        # The proxy writes Forwarded: an X-Forwarded-For header is the visitor's own.
        ([(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=198.51.100.9")], "198.51.100.9"),
        ([(b"x-forwarded-for", b"6.6.6.6")], "10.0.0.2"),
    ],
)
def test_rfc7239_forwarded_when_the_proxy_writes_it(
    headers: list[tuple[bytes, bytes]], expected: str
) -> None:
    options = {"trusted_proxies": ["10.0.0.0/8"], "forwarded_header": "forwarded"}
    assert visitor(headers, **options) == expected


def test_a_proxy_on_a_unix_socket_can_be_trusted() -> None:
    headers = [(b"x-forwarded-for", b"198.51.100.9")]
    assert visitor(headers, client=None, trusted_proxies=["unix"]) == "198.51.100.9"
    assert visitor(headers, client=None, trusted_proxies="unix") == "198.51.100.9"
    assert visitor(headers, client=None, trusted_proxies=["10.0.0.0/8"]) is None
    assert visitor(headers, client=("10.0.0.2", 1), trusted_proxies=["unix"]) == "10.0.0.2"
    # Any iterable, a generator too (read once for the networks, once for "unix").
    both = (p for p in ["unix", "10.0.0.0/8"])
    assert visitor(headers, client=None, trusted_proxies=both) == "198.51.100.9"
    both = (p for p in ["unix", "10.0.0.0/8"])
    assert visitor(headers, client=("10.0.0.2", 1), trusted_proxies=both) == "198.51.100.9"


def test_forwarded_header_option_is_checked() -> None:
    with pytest.raises(ValueError, match="forwarded_header"):
        config(forwarded_header="x-real-ip")


def test_ipv4_mapped_peer_matches_an_ipv4_trusted_network() -> None:
    headers = [(b"x-forwarded-for", b"198.51.100.23")]
    assert visitor(headers, client=("::ffff:10.0.0.2", 1), trusted_proxies="10.0.0.0/8") == (
        "198.51.100.23"
    )


def test_trusted_proxy_gives_scheme_and_host() -> None:
    cfg = config(trusted_proxies=["10.0.0.2"], assume_https=False)
    headers = [
        (b"host", b"internal:8000"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"www.example.org"),
    ]
    scope = http_scope("/p", headers=headers, client=PROXY)
    assert info_of(scope, cfg).url == "https://www.example.org/p"
    # Appending proxies: each list entry belongs to the hop at the same position.
    appended = [
        (b"x-forwarded-for", b"1.2.3.4, 198.51.100.7"),
        (b"x-forwarded-proto", b"http, https"),
        (b"x-forwarded-host", b"evil.example, shop.example"),
    ]
    scope = http_scope("/p", headers=appended, client=PROXY)
    assert info_of(scope, cfg).url == "https://shop.example/p"
    forwarded = [
        (b"host", b"internal"),
        (b"forwarded", b'for=1.2.3.4;proto=https;host="shop.example"'),
    ]
    scope = http_scope("/p", headers=forwarded, client=PROXY)
    rfc7239 = config(trusted_proxies=["10.0.0.2"], assume_https=False, forwarded_header="forwarded")
    assert info_of(scope, rfc7239).url == "https://shop.example/p"
    assert info_of(scope, cfg).url == "http://internal/p"
    # The same headers from an untrusted peer are ignored.
    scope = http_scope("/p", headers=headers, client=("192.0.2.1", 1))
    assert info_of(scope, cfg).url == "http://internal:8000/p"
    # An empty or odd proto is not believed.
    odd = [(b"host", b"h"), (b"x-forwarded-proto", b" ,x"), (b"x-forwarded-host", b",")]
    assert info_of(http_scope("/p", headers=odd, client=PROXY), cfg).url == "http://h/p"


@pytest.mark.parametrize(
    ("mask", "address", "expected"),
    [
        (0, "198.51.100.23", "198.51.100.23"),
        (1, "198.51.100.23", "198.51.100.0"),
        (2, "198.51.100.23", "198.51.0.0"),
        (3, "198.51.100.23", "198.0.0.0"),
        (1, "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
        (2, "2001:db8:1:2:3:4:5:6", "2001:db8:1::"),
        (3, "2001:db8:1:2:3:4:5:6", "2001:d00::"),
        (2, "not-an-ip", "not-an-ip"),
    ],
)
def test_visitor_ip_anonymisation(mask: int, address: str, expected: str) -> None:
    assert visitor([], client=(address, 1), anonymize_ip_bytes=mask) == expected


# --- route templates ---------------------------------------------------------------


def test_route_template_from_the_scope() -> None:
    route = SimpleNamespace(path="/users/{id}", path_format="/users/{id}")
    assert route_template({"route": route}) == "/users/{id}"
    assert route_template({"route": route, "root_path": "/api"}) == "/api/users/{id}"
    assert route_template({"route": SimpleNamespace(path="/x")}) == "/x"
    assert route_template({}) is None
    assert route_template({"route": SimpleNamespace(path="/m", routes=[])}) is None
    assert route_template({"route": SimpleNamespace(path="relative")}) is None
    assert route_template({"route": SimpleNamespace(path="/x"), "root_path": None}) == "/x"


def test_unmatched_404s_share_one_action_name() -> None:
    (hit,) = hits_for(http_scope("/wp-admin.php"), status=404, template=None)
    assert hit["action_name"] == "(not found)"
    assert hit["url"] == "https://example.org/wp-admin.php"
    (matched,) = hits_for(http_scope("/users/9"), status=404, template="/users/{id}")
    assert matched["action_name"] == "/users/9"
    (named,) = hits_for(status=404, overrides={"action_name": "Custom"})
    assert named["action_name"] == "Custom"


def test_route_template_from_litestar_path_template() -> None:
    assert route_template({"path_template": "/users/{user_id}"}) == "/users/{user_id}"
    scope = {"path_template": "/items/{id}", "root_path": "/shop"}
    assert route_template(scope) == "/shop/items/{id}"
    assert route_template({"path_template": ""}) is None
    assert route_template({"path_template": None}) is None
    # A Starlette route wins over a stale template left by an inner framework.
    both = {"route": SimpleNamespace(path="/a/{x}"), "path_template": "/b"}
    assert route_template(both) == "/a/{x}"


@pytest.mark.parametrize(
    ("route", "root_path", "expected"),
    [
        # Django's ResolverMatch, stored by app code in scope["route"].
        (SimpleNamespace(route="users/<int:pk>/", url_name="user"), "", "/users/<int:pk>/"),
        (SimpleNamespace(route="", url_name="home"), "", "/"),
        (SimpleNamespace(route="users/<int:pk>/"), "/site", "/site/users/<int:pk>/"),
        (SimpleNamespace(route="^articles/(?P<year>[0-9]{4})/$"), "", None),
        (SimpleNamespace(route=None), "", None),
        # A template string (Quart's request.url_rule.rule, or any framework).
        ("/users/<int:user_id>", "", "/users/<int:user_id>"),
        ("/users/<int:user_id>", "/api", "/api/users/<int:user_id>"),
        ("relative", "", None),
    ],
)
def test_route_template_from_app_code(route: object, root_path: str, expected: str | None) -> None:
    assert route_template({"route": route, "root_path": root_path}) == expected


def test_forwarded_scheme_and_host_come_from_the_client_hop() -> None:
    cfg = config(trusted_proxies=["10.0.0.0/8"], assume_https=False, forwarded_header="forwarded")
    spoofed = (
        b"for=6.6.6.6;proto=http;host=evil.example, "
        b"for=198.51.100.7;proto=https;host=shop.example, for=10.0.0.9"
    )
    scope = http_scope("/p", headers=[(b"forwarded", spoofed)], client=PROXY)
    info = info_of(scope, cfg)
    assert info.url == "https://shop.example/p"
    only_proto = [(b"forwarded", b"proto=https"), (b"host", b"h")]
    assert info_of(http_scope("/p", headers=only_proto, client=PROXY), cfg).url == "http://h/p"


@given(st.text())
def test_fast_quoting_is_urllib_quoting(value: str) -> None:
    assert quote_value(value) == quote(value, safe="")


@given(st.dictionaries(st.text(), st.text(), max_size=8))
def test_encoded_query_is_urlencode(params: dict[str, str]) -> None:
    assert encode_query(params) == urlencode(params, quote_via=quote)


def test_long_values_bypass_the_cache() -> None:
    value = "é" * 1000
    assert quote_value(value) == quote(value, safe="")


@pytest.mark.parametrize(
    ("cdt", "expected"),
    [
        ("2023-11-14 22:13:20", "1700000000"),
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc), "1700000000"),
        (datetime(2023, 11, 14, 22, 13, 20), "1700000000"),  # naive: UTC, as Matomo reads it
        ("nan", "1700000000"),
        ("inf", "1700000000"),
        (float("inf"), "1700000000"),
        ("-5", "1700000000"),
        (0, "1700000000"),
        ([1], "1700000000"),
    ],
)
def test_cdt_overrides_in_every_form_matomo_reads(cdt: object, expected: str) -> None:
    (hit,) = hits_for(overrides={"cdt": cdt})
    assert hit["cdt"] == expected


@pytest.mark.parametrize("value", [float("inf"), "1e400", float("-inf")])
def test_infinite_performance_values_are_dropped(value: object) -> None:
    (hit,) = hits_for(overrides={"pf_srv": value})
    assert "pf_srv" not in hit


def test_a_cip_override_is_anonymised_too() -> None:
    cfg = config(track_visitor_ip=True, anonymize_ip_bytes=2)
    (hit,) = hits_for(cfg=cfg, overrides={"cip": "198.51.100.77"})
    assert hit["cip"] == "198.51.0.0"


def test_route_details_template_keys_with_or_without_the_root_path() -> None:
    cfg = config(route_details={"/users/{id}": {"action_name": "Users"}})
    scope = http_scope("/api/users/5", root_path="/api")
    (hit,) = hits_for(scope, cfg=cfg, template="/api/users/{id}")
    assert hit["action_name"] == "Users"
    (other,) = hits_for(scope, cfg=cfg, template="/elsewhere/{id}")
    assert other["action_name"] == "/api/users/5"


@pytest.mark.parametrize("key", ["/users/{id:int}", "/users/{id}"])
@pytest.mark.parametrize("template", ["/users/{id:int}", "/users/{id}"])
def test_route_details_keys_match_with_or_without_converters(key: str, template: str) -> None:
    cfg = config(route_details={key: {"action_name": "Users"}})
    (hit,) = hits_for(http_scope("/users/5"), cfg=cfg, template=template)
    assert hit["action_name"] == "Users"


@pytest.mark.parametrize(
    ("method", "reported"),
    [("GET", "GET"), ("get", "GET"), ("Patch", "PATCH"), ("PROPFIND", "PROPFIND"), ("", "GET")],
)
def test_the_method_is_reported_in_uppercase(method: str, reported: str) -> None:
    assert info_of(http_scope("/", method=method)).method == reported


def test_a_method_that_is_no_text_is_a_get() -> None:
    scope = http_scope("/")
    scope["method"] = ["GET"]  # unhashable: never looked up in the table of methods
    assert info_of(scope).method == "GET"
