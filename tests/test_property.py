"""Generated requests: tracking never raises or changes a response, and yields valid hits."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_matomo import MatomoMiddleware, _core, _headers, _request
from asgi_matomo._bulk import bulk_body
from asgi_matomo._types import Receive, Scope, Send
from tests.helpers import BulkRecorder, call_app
from tests.helpers import config as tracking_config

HEADER_NAMES = [
    b"host",
    b"user-agent",
    b"accept-language",
    b"referer",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"Host",
    b"User-Agent",
    b"x-other",
    b"",
]

header = st.tuples(
    st.one_of(st.sampled_from(HEADER_NAMES), st.binary(max_size=20)),
    # Giant values are built by repetition: drawing 9000 random bytes is slow.
    st.one_of(st.binary(max_size=300), st.binary(min_size=1, max_size=30).map(lambda b: b * 400)),
)
address = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["127.0.0.1", "::1", "10.0.0.2", "", "not-an-ip"]), st.integers(0, 65535)
    ),
    st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
    st.just(["x"]),
)
scopes = st.fixed_dictionaries(
    {
        "type": st.just("http"),
        "method": st.one_of(
            st.sampled_from(["GET", "post", "PATCH", "BREW", ""]), st.text(max_size=8)
        ).filter(lambda method: method.upper() != "OPTIONS"),  # not tracked by default
        "path": st.one_of(st.text(max_size=200), st.just("")),
        "raw_path": st.one_of(st.none(), st.binary(max_size=200)),
        "root_path": st.one_of(st.just(""), st.sampled_from(["/api", "/"]), st.text(max_size=10)),
        "query_string": st.binary(max_size=300),
        "headers": st.lists(header, max_size=12),
        "client": address,
        "server": address,
        "scheme": st.sampled_from(["http", "https", "ws", "weird"]),
    },
    optional={"state": st.sampled_from([{}, {"asgi_matomo": {"uid": "x"}}, {"asgi_matomo": 5}])},
)


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps(
        {
            "path": scope.get("path"),
            "query": scope.get("query_string", b"").hex(),
            "headers": [[bytes(n).hex(), bytes(v).hex()] for n, v in scope.get("headers", [])],
        }
    ).encode()
    status = 200 + len(scope.get("path") or "") % 300
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"x-len", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes, token=st.booleans(), proxies=st.booleans())
def test_generated_requests_get_identical_responses_and_valid_hits(
    scope: dict[str, Any], token: bool, proxies: bool
) -> None:
    matomo = BulkRecorder()

    async def main() -> None:
        app = MatomoMiddleware(
            bare_app,
            matomo_url="https://matomo.example.org",
            idsite=3,
            client=matomo,  # type: ignore[arg-type]
            access_token="t0ken" if token else None,
            trusted_proxies=["10.0.0.0/8", "::1"] if proxies else None,
            anonymize_ip_bytes=2 if proxies else 0,
        )
        expected = await call_app(bare_app, dict(scope))
        assert await call_app(app, dict(scope)) == expected

    anyio.run(main)
    assert len(matomo.received) == 1
    (body,) = matomo.received
    # The token travels only with batches that need it: hits carrying the visitor IP.
    needs_token = token and any("&cip=" in element for element in body["requests"])
    assert ("token_auth" in body) is needs_token
    for element in body["requests"]:
        assert element.startswith("?")
        params = dict(parse_qsl(element[1:], keep_blank_values=True))
        assert params["idsite"] == "3"
        assert params["rec"] == "1"
        assert params["url"].startswith("https://")
        assert len(params["url"]) <= 1024
        assert len(params["action_name"]) <= 1024
        if not token:
            assert "cip" not in params


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.lists(header, max_size=12))
def test_the_fast_header_table_reads_what_the_careful_loop_reads(
    headers: list[tuple[bytes, bytes]],
) -> None:
    # Servers send lowercase names once each: those take a dict built in C. Any
    # list (repeated names, mixed case, empty names) must read the same as the loop.
    assert _headers.read_headers({"headers": headers}) == _headers.read_headers_by_loop(headers)
    assert _headers.read_headers({"headers": tuple(headers)}) == _headers.read_headers_by_loop(
        headers
    )
    # Without a trusted proxy only four are looked up: the same values for those.
    wanted = _headers.DIRECT_ORDER
    direct = _headers.read_headers({"headers": headers}, wanted)
    expected = _headers.read_headers_by_loop(headers)
    assert {k: direct[k] for k in wanted if k in direct} == {
        k: expected[k] for k in wanted if k in expected
    }


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scope=scopes,
    status=st.one_of(st.integers(100, 599), st.just(404)),
    elapsed_ms=st.one_of(st.none(), st.floats(allow_nan=True), st.floats(0, 20_000_000)),
    template=st.one_of(st.none(), st.sampled_from(["/users/{id}", "/api/{p:path}"])),
    token=st.booleans(),
    from_route=st.booleans(),
    proxies=st.booleans(),
)
def test_the_plain_hit_is_the_general_hit(
    scope: dict[str, Any],
    status: int,
    elapsed_ms: float | None,
    template: str | None,
    token: bool,
    from_route: bool,
    proxies: bool,
) -> None:
    config = tracking_config(
        idsite=7,
        track_visitor_ip=token,
        assume_https=not proxies,
        ignored_methods=None,
        action_name_from_route=from_route,
        trusted_proxies=["10.0.0.0/8", "::1"] if proxies else None,
        anonymize_ip_bytes=1 if proxies else 0,
    )
    info = _request.inspect_request(config, scope, 1_700_000_000.5)
    if info is None:
        return
    common: dict[str, Any] = {"status": status, "elapsed_ms": elapsed_ms, "template": template}
    plain = _core.build_hits(config, info, overrides=None, rand=lambda: 42, **common)
    # An override with a key that is no parameter changes nothing, but takes the
    # general path: merge into a dict of parameters, then encode.
    general = _core.build_hits(config, info, overrides={0: "x"}, rand=lambda: 42, **common)
    assert plain == general


@settings(max_examples=1000, deadline=None)
@given(scope=scopes)
def test_the_common_paths_shortcut_is_the_general_rule(scope: dict[str, Any]) -> None:
    assert _request._paths(scope) == _request._paths_general(
        scope.get("root_path"), scope.get("path"), scope.get("raw_path")
    )


@settings(max_examples=500, deadline=None)
@given(
    requests=st.lists(
        st.one_of(
            st.text(alphabet="?&=%ABCabc0123456789-._~", max_size=40),
            st.text(max_size=20),
            st.just("?lone=\ud800"),
        ),
        max_size=8,
    ),
    token=st.one_of(st.none(), st.text(max_size=10)),
)
def test_the_bulk_body_is_the_json_matomo_reads(requests: list[str], token: str | None) -> None:
    # Percent-encoded hits are joined as they are; anything else is escaped by json.
    body = json.loads(bulk_body(requests, token))
    assert body == ({"requests": requests} | ({"token_auth": token} if token is not None else {}))
