"""Forwarding headers from a peer outside `trusted_proxies`: ignored, and said once.

The headers are rightly not believed, but when the peer is the app's own proxy
every visitor is recorded with the proxy's address; one WARNING per process says
which peer, never an address from the headers, and what to set.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_matomo import _request
from asgi_matomo._collector import Collector
from asgi_matomo._request import inspect_request
from tests.helpers import config, http_scope
from tests.servers import serve

PROXY = ("10.0.0.2", 443)
VISITOR = "198.51.100.7"


@pytest.fixture(autouse=True)
def watching(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process: nothing said yet."""
    monkeypatch.setattr(_request, "_next_watch", 0.0)


def warnings_for(
    caplog: pytest.LogCaptureFixture,
    scopes: list[dict[str, Any]],
    start: float = 0.0,
    **options: Any,
) -> list[str]:
    cfg = config(track_visitor_ip=True, **options)
    with caplog.at_level(logging.DEBUG, logger="asgi_matomo"):
        for second, scope in enumerate(scopes):
            # A second apart: one request a second is looked at.
            info = inspect_request(cfg, scope, start + second)
            assert info is not None
            believed = info.visitor_ip == VISITOR
            assert believed == (options.get("trusted_proxies") == ["10.0.0.2"])
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def from_proxy(
    header: bytes = b"x-forwarded-for", value: bytes = VISITOR.encode(), **kw: Any
) -> Any:
    return http_scope("/", headers=[(b"host", b"app"), (header, value)], **kw)


def test_said_once_with_the_peer_and_what_to_set(caplog: pytest.LogCaptureFixture) -> None:
    scopes = [from_proxy(client=PROXY), from_proxy(client=("10.0.0.3", 443))]
    (warning,) = warnings_for(caplog, scopes)
    assert 'X-Forwarded-For header from "10.0.0.2"' in warning
    assert 'set trusted_proxies=["10.0.0.2"]' in warning
    assert "forwarded_header" not in warning
    assert VISITOR not in warning  # the visitor's address stays out of the log


def test_a_peer_outside_the_trusted_proxies_is_named_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    (warning,) = warnings_for(caplog, [from_proxy(client=PROXY)], trusted_proxies=["10.9.0.0/16"])
    assert 'trusted_proxies=["10.0.0.2"]' in warning


def test_a_forwarded_header_also_names_the_option_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scope = from_proxy(b"forwarded", f"for={VISITOR};proto=https".encode(), client=PROXY)
    (warning,) = warnings_for(caplog, [scope])
    assert 'Forwarded header from "10.0.0.2"' in warning
    assert 'trusted_proxies=["10.0.0.2"] and forwarded_header="forwarded"' in warning
    assert VISITOR not in warning


def test_a_public_peer_is_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone may send these headers: a public peer may be a visitor, not a proxy."""
    (warning,) = warnings_for(caplog, [from_proxy(client=("93.184.216.34", 5000))])
    assert "93.184.216.34" not in warning
    assert "a public address (not shown" in warning
    assert 'trusted_proxies=["<your proxy\'s address or network>"]' in warning


def test_a_peer_on_a_unix_socket(caplog: pytest.LogCaptureFixture) -> None:
    (warning,) = warnings_for(caplog, [from_proxy(client=None)])
    assert "from a unix socket" in warning
    assert 'trusted_proxies=["unix"]' in warning


def test_a_dual_stack_peer_is_named_as_ipv4(caplog: pytest.LogCaptureFixture) -> None:
    (warning,) = warnings_for(caplog, [from_proxy(client=("::ffff:10.0.0.2", 443))])
    assert 'trusted_proxies=["10.0.0.2"]' in warning


@pytest.mark.parametrize(
    ("header", "value"),
    [(b"x-forwarded-for", b"10.0.0.2"), (b"forwarded", b'for="10.0.0.2:4711"')],
)
def test_nothing_said_when_the_server_already_resolved_the_client(
    caplog: pytest.LogCaptureFixture, header: bytes, value: bytes
) -> None:
    """uvicorn's --proxy-headers put an address of the chain in `client`: tracking is right."""
    scopes = [from_proxy(header, value, client=PROXY), from_proxy(client=("10.0.0.3", 443))]
    assert warnings_for(caplog, scopes) == []


def test_nothing_said_for_a_trusted_peer(caplog: pytest.LogCaptureFixture) -> None:
    assert warnings_for(caplog, [from_proxy(client=PROXY)], trusted_proxies=["10.0.0.2"]) == []
    # And it still watches for an untrusted one.
    assert _request._next_watch == 0.0


def test_requests_without_forwarding_headers_say_nothing_and_keep_watching(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert warnings_for(caplog, [http_scope("/", client=PROXY)] * 3) == []
    assert _request._next_watch == 3.0  # the next second is looked at again
    assert len(warnings_for(caplog, [from_proxy(client=PROXY)], start=3.0)) == 1
    # Once a forwarding header was seen, never again: only the headers a hit needs.
    assert _request._next_watch == math.inf


def test_one_request_a_second_is_looked_at(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config()
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        inspect_request(cfg, http_scope("/", client=PROXY), 100.0)
        inspect_request(cfg, from_proxy(client=PROXY), 100.5)  # not looked at
        assert caplog.records == []
        inspect_request(cfg, from_proxy(client=PROXY), 101.0)
    (warning,) = caplog.records
    assert 'trusted_proxies=["10.0.0.2"]' in warning.getMessage()


def test_repeated_header_names_are_read_too(caplog: pytest.LogCaptureFixture) -> None:
    """Servers may pass a header twice: the careful loop reads the forwarding headers too."""
    headers = [(b"accept", b"a"), (b"accept", b"b"), (b"x-forwarded-for", VISITOR.encode())]
    (warning,) = warnings_for(caplog, [http_scope("/", headers=headers, client=PROXY)])
    assert 'trusted_proxies=["10.0.0.2"]' in warning


@pytest.mark.slow
def test_said_once_by_a_real_server(tmp_path: Path) -> None:
    """From 127.0.0.2 (uvicorn believes proxy headers from 127.0.0.1 only)."""
    with (
        Collector() as collector,
        serve("tests.apps:server_app", collector.tracking_url, tmp_path) as server,
        httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as client,
    ):
        for _ in range(3):
            headers = {"x-forwarded-for": VISITOR}
            client.get(server.url + "/", headers=headers).raise_for_status()
        collector.wait_for_hits(3)
    lines = [line for line in server.log().splitlines() if "trusted_proxies" in line]
    assert len(lines) == 1
    assert 'set trusted_proxies=["127.0.0.2"]' in lines[0]
    assert VISITOR not in server.log()
