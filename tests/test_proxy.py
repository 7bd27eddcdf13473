"""Forwarding headers read as the proxies wrote them: RFC 7239 quoting, and long chains."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_matomo._core import build_hits
from asgi_matomo._headers import read_headers_by_loop
from asgi_matomo._overrides import MAX_TEXT_LENGTH
from asgi_matomo._proxy import (
    Forwarded,
    _forwarded_elements,
    parse_ip,
    parse_trusted_proxies,
    resolve_forwarded,
)
from asgi_matomo._request import inspect_request
from tests.helpers import config, http_scope

PROXY = ("10.0.0.2", 443)
NETWORKS = parse_trusted_proxies(["10.0.0.0/8"])


def client_of(forwarded: str) -> str | None:
    return resolve_forwarded(
        forwarded=forwarded,
        x_forwarded_for=None,
        x_forwarded_proto=None,
        x_forwarded_host=None,
        networks=NETWORKS,
    ).client


@pytest.mark.parametrize(
    ("header", "elements"),
    [
        (
            'for=2.2.2.2;host="good.com, for=6.6.6.6"',
            [{"for": "2.2.2.2", "host": "good.com, for=6.6.6.6"}],
        ),
        ('for=2.2.2.2;host="a;b=c"', [{"for": "2.2.2.2", "host": "a;b=c"}]),
        (r'for="a\"b, c";by=x', [{"for": 'a"b, c', "by": "x"}]),
        (r'for="back\\slash"', [{"for": "back\\slash"}]),
        ('for="[2001:db8::7]:4711";proto=https', [{"for": "[2001:db8::7]:4711", "proto": "https"}]),
        ("for=1.1.1.1, for=2.2.2.2", [{"for": "1.1.1.1"}, {"for": "2.2.2.2"}]),
        (" For = 1.1.1.1 ; PROTO=https ,", [{"for": "1.1.1.1", "proto": "https"}, {}]),
        ("for=1.1.1.1,,for=2.2.2.2", [{"for": "1.1.1.1"}, {}, {"for": "2.2.2.2"}]),
        ("proto", [{}]),
        ("", [{}]),
    ],
)
def test_forwarded_elements_follow_rfc7239(header: str, elements: list[dict[str, str]]) -> None:
    assert _forwarded_elements(header) == elements


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ('for="2.2.2.2', None),  # a quote left open
        ('for=2.2"2.2', None),  # a quote inside a token
        ("for=1.1.1.1 2.2.2.2", None),  # two tokens
        ("for=1.1.1.1;for=6.6.6.6", None),  # a parameter twice in one element
        ('"for"=1.1.1.1', None),
        # Text after a closing quote; the element after the next comma is whole.
        ('for="2.2.2.2"x, for=3.3.3.3', "3.3.3.3"),
    ],
)
def test_a_malformed_forwarded_line_gives_no_element(header: str, client: str | None) -> None:
    assert _forwarded_elements(header) == []
    assert client_of(header) == client


VISITOR_LINES = [
    'for="6.6.6.6',  # a quote left open
    "for=6.6.6.6;for=7.7.7.7",  # a parameter twice
    'for=6.6.6.6;host="a"b',  # text after a closing quote
    "for=6.6.6.6 7.7.7.7",  # two tokens
    '"',
]


@pytest.mark.parametrize("garbage", VISITOR_LINES)
def test_a_malformed_line_of_the_visitor_keeps_the_lines_the_proxies_added(garbage: str) -> None:
    """Each proxy adding its own field line: the visitor's line cannot hide them."""
    one_proxy = f'{garbage}\nfor=198.51.100.7;proto=https;host="www.example.org"'
    forwarded = resolve_forwarded(
        forwarded=one_proxy,
        x_forwarded_for=None,
        x_forwarded_proto=None,
        x_forwarded_host=None,
        networks=NETWORKS,
    )
    assert forwarded == Forwarded("198.51.100.7", "https", "www.example.org")
    # Behind two trusted proxies, each with its line: the walk goes on past the inner one.
    assert client_of(f"{garbage}\nfor=198.51.100.7\nfor=10.0.0.3") == "198.51.100.7"


@pytest.mark.parametrize("garbage", VISITOR_LINES)
def test_a_malformed_start_of_a_line_keeps_the_elements_a_proxy_appended(garbage: str) -> None:
    """nginx's `$http_forwarded, for=$remote_addr`: one line, the visitor's text first."""
    assert client_of(f"{garbage}, for=198.51.100.7") == "198.51.100.7"
    assert client_of(f"{garbage}, for=198.51.100.7, for=10.0.0.3;proto=https") == "198.51.100.7"


def test_a_malformed_line_stops_the_walk_from_the_right() -> None:
    """What a broken line hides is unknown: the hop next to it is the client, never further."""
    assert client_of("for=6.6.6.6\nfor=1.1.1.1;for=2.2.2.2\nfor=10.0.0.5") == "10.0.0.5"
    assert client_of('for=6.6.6.6, for="1.1.1.1, for=10.0.0.5') == "10.0.0.5"


def test_elements_before_the_last_quote_of_a_malformed_line_are_never_read() -> None:
    """A proxy that puts the visitor's Host in quotes unescaped; only the left is the visitor's.

    Read from the right, `for=6.6.6.6;host="evil"` would look like an element of its own.
    """
    line = 'for=198.51.100.7;host="x, for=6.6.6.6;host="evil"'
    assert _forwarded_elements(line) == []
    assert client_of(line) is None


def test_forwarded_lines_stay_apart_and_x_forwarded_for_lines_are_joined() -> None:
    headers = [
        (b"forwarded", b'for="6.6.6.6'),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"forwarded", b"for=198.51.100.7"),
        (b"x-forwarded-for", b"198.51.100.7"),
    ]
    found = read_headers_by_loop(headers)
    assert found[b"forwarded"] == 'for="6.6.6.6\nfor=198.51.100.7'
    assert found[b"x-forwarded-for"] == "6.6.6.6, 198.51.100.7"


def test_a_request_with_a_malformed_forwarded_line_before_the_proxys_line() -> None:
    cfg = config(
        trusted_proxies=["10.0.0.0/8"], forwarded_header="forwarded", track_visitor_ip=True
    )
    headers = [
        (b"host", b"app"),
        (b"forwarded", b'for="6.6.6.6;proto=http;host=evil.example'),
        (b"forwarded", b"for=198.51.100.7;proto=https;host=www.example.org"),
    ]
    info = inspect_request(cfg, http_scope("/", headers=headers, client=PROXY), 0.0)
    assert info is not None
    assert info.visitor_ip == "198.51.100.7"
    assert info.url == "https://www.example.org/"


PROXIED = "198.51.100.7"
visitor_text = st.text(alphabet='for=1.2.3.4,; "\\ab', max_size=40)


@settings(max_examples=1000, deadline=None)
@given(garbage=visitor_text, separate_line=st.booleans())
def test_whatever_the_visitor_writes_first_the_proxys_element_is_read(
    garbage: str, separate_line: bool
) -> None:
    appended = f"for={PROXIED}"
    header = f"{garbage}\n{appended}" if separate_line else f"{garbage}, {appended}"
    assert client_of(header) == PROXIED


@settings(max_examples=1000, deadline=None)
@given(host=st.text(alphabet="for=6.7,; \\ab", max_size=40), garbage=visitor_text)
def test_a_host_the_proxy_quoted_never_chooses_the_address(host: str, garbage: str) -> None:
    """The proxy quotes the visitor's Host without escaping (nginx's `host=\\"$host\\"`)."""
    line = f'for={PROXIED};host="{host}"'
    assert client_of(line) in (PROXIED, None)
    assert client_of(f"{garbage}\n{line}") in (PROXIED, None)


def test_a_comma_in_a_quoted_host_does_not_split_the_element() -> None:
    assert client_of('for=2.2.2.2;host="good.com, for=6.6.6.6"') == "2.2.2.2"
    assert client_of('for=2.2.2.2;host="good.com; for=6.6.6.6"') == "2.2.2.2"
    # The proxy's own element after a visitor-controlled host stays the last hop.
    chain = 'for=9.9.9.9, for=2.2.2.2;host="x, for=6.6.6.6", for=10.0.0.3'
    assert client_of(chain) == "2.2.2.2"


def test_a_quoted_host_with_a_comma_resolves_the_visitor_in_a_request() -> None:
    cfg = config(
        trusted_proxies=["10.0.0.0/8"], forwarded_header="forwarded", track_visitor_ip=True
    )
    header = b'for=2.2.2.2;proto=https;host="good.com, for=6.6.6.6"'
    scope = http_scope("/", headers=[(b"forwarded", header), (b"host", b"app")], client=PROXY)
    info = inspect_request(cfg, scope, 0.0)
    assert info is not None
    assert info.visitor_ip == "2.2.2.2"
    assert info.url == "https://app/"  # the quoted host is no host: the Host header is used


@pytest.mark.parametrize("name", [b"x-forwarded-for", b"forwarded"])
@pytest.mark.parametrize("repeated", [False, True])
def test_a_long_forwarding_chain_keeps_the_entries_the_proxies_appended(
    name: bytes, repeated: bool
) -> None:
    """Clipped from the left: a visitor's long header cannot push out the proxy's entry."""
    forwarded = name == b"forwarded"
    cfg = config(
        trusted_proxies=["10.0.0.0/8"],
        forwarded_header="forwarded" if forwarded else "x-forwarded-for",
        track_visitor_ip=True,
    )
    entry = b"for=6.6.6.6" if forwarded else b"6.6.6.6"
    spoofed = b", ".join([entry] * (MAX_TEXT_LENGTH // len(entry) + 10))
    appended = b"for=198.51.100.7" if forwarded else b"198.51.100.7"
    headers = (
        [(name, spoofed), (name, appended)] if repeated else [(name, spoofed + b", " + appended)]
    )
    scope = http_scope("/", headers=headers, client=PROXY)
    info = inspect_request(cfg, scope, 0.0)
    assert info is not None
    assert info.visitor_ip == "198.51.100.7"


pair_values = st.one_of(
    st.text(alphabet="abc.:[]19 ", max_size=8),
    st.text(alphabet='abc ,;="\\', max_size=8).map(
        lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
)
elements = st.dictionaries(st.sampled_from(["for", "by", "host", "proto"]), pair_values, max_size=4)


@settings(max_examples=500, deadline=None)
@given(chain=st.lists(elements, min_size=1, max_size=4))
def test_well_formed_headers_read_back_as_written(chain: list[dict[str, str]]) -> None:
    header = ", ".join(";".join(f"{key}={value}" for key, value in el.items()) for el in chain)
    expected = [
        {
            key: value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            if value.startswith('"')
            else value.strip()
            for key, value in el.items()
        }
        for el in chain
    ]
    parsed = _forwarded_elements(header)
    if any(" " in v.strip() for el in chain for v in el.values() if not v.startswith('"')):
        assert parsed == []  # a space inside a token is no token
    else:
        assert parsed == expected


@settings(max_examples=1000, deadline=None)
@given(header=st.text(alphabet='for=1.2.3.4,; "\\ab', max_size=60))
def test_any_forwarded_header_parses_or_gives_nothing(header: str) -> None:
    parsed = _forwarded_elements(header)
    assert all(isinstance(element, dict) for element in parsed)
    client_of(header)  # never raises


# --- IPv4-mapped IPv6 addresses: one visitor, one address -------------------------------


@pytest.mark.parametrize(
    "token", ["::ffff:192.0.2.1", "[::ffff:192.0.2.1]:4711", '"[::FFFF:c000:201]"']
)
def test_an_ipv4_mapped_address_is_read_as_ipv4(token: str) -> None:
    assert parse_ip(token) == ipaddress.IPv4Address("192.0.2.1")


def test_an_ipv4_mapped_trusted_network_matches_ipv4_peers() -> None:
    assert parse_trusted_proxies(["::ffff:10.0.0.0/104", "::ffff:10.1.2.3"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("10.1.2.3/32"),
    )
    # Not mapped: left alone.
    assert parse_trusted_proxies(["::/0"]) == (ipaddress.IPv6Network("::/0"),)


def test_a_dual_stack_peer_is_unmapped_for_cip_and_the_visitor_id() -> None:
    cfg = config(track_visitor_ip=True, visitor_ids=True, visitor_key="k" * 32)
    mapped = inspect_request(cfg, http_scope("/", client=("::ffff:192.0.2.1", 5000)), 0.0)
    plain = inspect_request(cfg, http_scope("/", client=("192.0.2.1", 5000)), 0.0)
    assert mapped is not None
    assert plain is not None
    assert mapped.visitor_ip == "192.0.2.1"
    assert mapped.visitor_id == plain.visitor_id is not None


def test_a_dual_stack_proxy_is_trusted_and_the_forwarded_visitor_unmapped() -> None:
    for header, value in [
        ("x-forwarded-for", b"::ffff:198.51.100.7, ::ffff:10.0.0.3"),
        ("forwarded", b'for="[::ffff:198.51.100.7]:4711", for=10.0.0.3'),
    ]:
        cfg = config(trusted_proxies=["10.0.0.0/8"], forwarded_header=header, track_visitor_ip=True)
        scope = http_scope("/", headers=[(header.encode(), value)], client=("::ffff:10.0.0.2", 443))
        info = inspect_request(cfg, scope, 0.0)
        assert info is not None
        assert info.visitor_ip == "198.51.100.7"


def test_a_dual_stack_peer_is_anonymized_as_ipv4() -> None:
    cfg = config(track_visitor_ip=True, anonymize_ip_bytes=2)
    info = inspect_request(cfg, http_scope("/", client=("::ffff:192.0.2.1", 5000)), 0.0)
    assert info is not None
    assert info.visitor_ip == "192.0.0.0"


@pytest.mark.parametrize("peer", ["2001:db8::1", "::1", "not:an:address"])
def test_other_peers_with_a_colon_are_kept_as_given(peer: str) -> None:
    info = inspect_request(config(track_visitor_ip=True), http_scope("/", client=(peer, 1)), 0.0)
    assert info is not None
    assert info.visitor_ip == peer


def test_an_ipv4_mapped_cip_override_is_sent_as_ipv4() -> None:
    cfg = config(track_visitor_ip=True)
    info = inspect_request(cfg, http_scope("/"), 0.0)
    assert info is not None
    (hit,) = build_hits(
        cfg,
        info,
        status=200,
        elapsed_ms=None,
        template=None,
        overrides={"cip": "::ffff:192.0.2.1"},
        rand=lambda: 1,
    )
    assert hit.cip == "192.0.2.1"
