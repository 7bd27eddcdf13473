"""Forwarding headers read as the proxies wrote them: RFC 7239 quoting, and long chains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_matomo._overrides import MAX_TEXT_LENGTH
from asgi_matomo._proxy import _forwarded_elements, parse_trusted_proxies, resolve_forwarded
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
    "header",
    [
        'for="2.2.2.2',  # a quote left open
        'for="2.2.2.2"x, for=3.3.3.3',  # text after a closing quote
        'for=2.2"2.2',  # a quote inside a token
        "for=1.1.1.1 2.2.2.2",  # two tokens
        "for=1.1.1.1;for=6.6.6.6",  # a parameter twice in one element
        '"for"=1.1.1.1',
    ],
)
def test_a_malformed_forwarded_header_gives_no_element(header: str) -> None:
    assert _forwarded_elements(header) == []
    assert client_of(header) is None


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
