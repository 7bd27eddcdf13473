"""Generated requests: tracking never raises or changes a response, and yields valid hits."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_matomo import MatomoMiddleware
from asgi_matomo._types import Message, Receive, Scope, Send

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
        ),
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


async def run(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes, token=st.booleans(), proxies=st.booleans())
def test_generated_requests_get_identical_responses_and_valid_hits(
    scope: dict[str, Any], token: bool, proxies: bool
) -> None:
    received: list[dict[str, Any]] = []

    class Matomo:
        """The smallest client the sender accepts: records each bulk body."""

        async def post(self, url: str, **kwargs: Any) -> httpx.Response:
            received.append(json.loads(kwargs["content"]))
            return httpx.Response(204)

    async def main() -> None:
        app = MatomoMiddleware(
            bare_app,
            matomo_url="https://matomo.example.org",
            idsite=3,
            client=Matomo(),  # type: ignore[arg-type]
            access_token="t0ken" if token else None,
            trusted_proxies=["10.0.0.0/8", "::1"] if proxies else None,
            anonymize_ip_bytes=2 if proxies else 0,
        )
        expected = await run(bare_app, dict(scope))
        assert await run(app, dict(scope)) == expected

    anyio.run(main)
    assert len(received) == 1
    (body,) = received
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
