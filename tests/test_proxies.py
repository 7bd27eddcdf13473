"""Visitor IP, scheme and host behind reverse proxies, over real HTTP against a real uvicorn.

Loopback has a whole /8, so each party gets its own address: the visitor is
127.0.0.5, the edge proxy 127.0.0.2, the inner proxy 127.0.0.3 and the app
127.0.0.1. uvicorn itself believes proxy headers from 127.0.0.1 only (its
default), so unless a test says otherwise, whatever the middleware reports
comes from its own `trusted_proxies` handling. The collector has a token, so
`cip` (the visitor IP) is accepted and stored.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from tests.servers import Server, free_port, serve, wait_for_port

pytestmark = pytest.mark.slow

APP = "tests.apps:server_app"
TOKEN = "0123456789abcdef0123456789abcdef"
VISITOR, EDGE, INNER = "127.0.0.5", "127.0.0.2", "127.0.0.3"
SPOOFED = {
    "x-forwarded-for": "6.6.6.6",
    "x-forwarded-proto": "https",
    "x-forwarded-host": "evil.example",
    "forwarded": "for=6.6.6.6;proto=https;host=evil.example",
}
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length", "content-encoding"}
)
# "forwarded-line": RFC 7239 too, each proxy adding a field line of its own.
Style = Literal["x-forwarded", "forwarded", "forwarded-line"]
# The middleware's forwarded_header for each style of proxy.
HEADER_OF = {"x-forwarded": "x-forwarded-for", "forwarded": "forwarded"}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(token=TOKEN) as running:
        yield running


def options(**extra: Any) -> dict[str, Any]:
    """Report the visitor IP (needs the token); the scheme as seen, not assumed.

    A short flush interval: each test waits for its hits while the server runs.
    """
    return {"access_token": TOKEN, "assume_https": False, "flush_interval": 0.05, **extra}


def client_from(address: str, **kwargs: Any) -> httpx.Client:
    """An HTTP client whose connections come from `address`."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), **kwargs)


def only_hit(collector: Collector) -> StoredHit:
    (hit,) = collector.wait_for_hits(1)
    return hit


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer

    def do_GET(self) -> None:
        proxy = self.server
        peer = self.client_address[0]
        original_host = self.headers.get("Host", "")
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        if proxy.style == "x-forwarded":
            # Like nginx's `$proxy_add_x_forwarded_for`: append the peer to the chain.
            chain = self.headers.get("X-Forwarded-For")
            replaced = {"x-forwarded-for"}
            if proxy.edge:
                # The edge proxy (where TLS ends) says what the visitor used, overwriting
                # whatever the visitor sent; inner proxies pass those headers on.
                replaced |= {"x-forwarded-proto", "x-forwarded-host"}
            headers = [(k, v) for k, v in headers if k.lower() not in replaced]
            headers.append(("X-Forwarded-For", f"{chain}, {peer}" if chain else peer))
            if proxy.edge:
                headers.append(("X-Forwarded-Proto", proxy.proto))
                headers.append(("X-Forwarded-Host", original_host))
        else:
            # RFC 7239: each proxy appends one element about the request it received.
            node = f'"[{peer}]"' if ":" in peer else peer
            element = f'for={node};proto={proxy.proto};host="{original_host}"'
            if proxy.style == "forwarded-line":
                headers.append(("Forwarded", element))  # the lines received are passed on
            else:
                chain = self.headers.get("Forwarded")
                headers = [(k, v) for k, v in headers if k.lower() != "forwarded"]
                headers.append(("Forwarded", f"{chain}, {element}" if chain else element))
        upstream = proxy.client.get(proxy.upstream + self.path, headers=headers)
        self.send_response(upstream.status_code)
        for name, value in upstream.headers.multi_items():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ProxyServer(ThreadingHTTPServer):
    def __init__(self, host: str, upstream: str, style: Style, proto: str, edge: bool) -> None:
        super().__init__((host, 0), _ProxyHandler)
        self.upstream = upstream
        self.style = style
        self.proto = proto
        self.edge = edge
        # Upstream connections come from the proxy's own address, as on a real host.
        self.client = client_from(host)


class ReverseProxy:
    """A tiny real reverse proxy on loopback that forwards GETs and adds forwarding headers."""

    def __init__(
        self, host: str, upstream: str, style: Style, *, proto: str = "http", edge: bool = False
    ) -> None:
        self._server = _ProxyServer(host, upstream, style, proto, edge)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ReverseProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server.client.close()


def host_of(server: Server) -> str:
    return server.url.removeprefix("http://")


# --- spoofing: headers from a peer nobody trusts change nothing -------------------------


@pytest.mark.parametrize("trusted", [None, [INNER, EDGE]], ids=["no-trusted", "peer-untrusted"])
def test_spoofed_headers_from_an_untrusted_peer(
    trusted: Sequence[str] | None, collector: Collector, tmp_path: Path
) -> None:
    opts = options(trusted_proxies=trusted)
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        client_from(VISITOR) as client,
    ):
        response = client.get(server.url + "/?rid=spoof", headers=SPOOFED)
        assert response.text.split()[0] == VISITOR  # uvicorn did not believe them either
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    assert hit.url == f"http://{host_of(server)}/?rid=spoof"


@pytest.mark.parametrize("style", ["x-forwarded", "forwarded"])
def test_headers_from_a_trusted_peer_sent_directly(
    style: Style, collector: Collector, tmp_path: Path
) -> None:
    if style == "x-forwarded":
        headers = {
            "x-forwarded-for": "198.51.100.23",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "www.example.org",
        }
    else:
        headers = {"forwarded": 'for="198.51.100.23:4711";proto=https;host=www.example.org'}
    opts = options(trusted_proxies=[INNER], forwarded_header=HEADER_OF[style])
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        client_from(INNER) as client,
    ):
        client.get(server.url + "/?rid=direct", headers=headers).raise_for_status()
        hit = only_hit(collector)
    assert hit.visitor_ip == "198.51.100.23"
    assert hit.url == "https://www.example.org/?rid=direct"


# --- real proxies in front of the app ---------------------------------------------------


@contextlib.contextmanager
def two_proxies(server: Server, style: Style) -> Iterator[ReverseProxy]:
    """visitor -> edge (127.0.0.2, where TLS would end) -> inner (127.0.0.3) -> app."""
    with (
        ReverseProxy(INNER, server.url, style) as inner,
        ReverseProxy(EDGE, inner.url, style, proto="https", edge=True) as edge,
    ):
        yield edge


@pytest.mark.parametrize("style", ["x-forwarded", "forwarded"])
@pytest.mark.parametrize(
    ("trusted", "visitor"),
    [(["127.0.0.2/32", INNER], VISITOR), ([INNER], EDGE)],
    ids=["both-trusted", "inner-only"],
)
def test_through_two_reverse_proxies(
    style: Style, trusted: list[str], visitor: str, collector: Collector, tmp_path: Path
) -> None:
    opts = options(trusted_proxies=trusted, forwarded_header=HEADER_OF[style])
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        two_proxies(server, style) as edge,
        client_from(VISITOR) as client,
    ):
        # A visitor's own X-Forwarded-For (or Forwarded, when the proxies write
        # X-Forwarded-For) is kept by the proxies and must be ignored.
        spoofed = {"x-forwarded-for": "6.6.6.6"}
        if style == "x-forwarded":
            spoofed["forwarded"] = "for=6.6.6.7;proto=http;host=evil.example"
        headers = {"host": "www.example.org", **spoofed}
        response = client.get(edge.url + "/?rid=proxied", headers=headers)
        assert response.status_code == 200
        assert response.text.split()[0] == INNER  # the app's peer is the inner proxy
        hit = only_hit(collector)
    # Never an address from a hop that is not trusted, nor the spoofed one.
    assert hit.visitor_ip == visitor
    if visitor == VISITOR:
        # Scheme and host as the visitor used them, not the inner hops.
        assert hit.url == "https://www.example.org/?rid=proxied"


def test_forwarded_proto_and_host_from_the_visitor_are_ignored(
    collector: Collector, tmp_path: Path
) -> None:
    opts = options(trusted_proxies=[EDGE, INNER], forwarded_header="forwarded")
    spoofed = {"host": "www.example.org", "forwarded": "for=6.6.6.6;proto=http;host=evil.example"}
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        two_proxies(server, "forwarded") as edge,
        client_from(VISITOR) as client,
    ):
        client.get(edge.url + "/?rid=spoof", headers=spoofed).raise_for_status()
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR  # right: the chain is walked from the app's side
    assert hit.url == "https://www.example.org/?rid=spoof"  # not http://evil.example/


def test_a_malformed_forwarded_line_of_the_visitor_keeps_the_lines_the_proxies_added(
    collector: Collector, tmp_path: Path
) -> None:
    """The visitor's own Forwarded line opens a quote; each proxy adds a line after it."""
    opts = options(trusted_proxies=[EDGE, INNER], forwarded_header="forwarded")
    garbage = {"host": "www.example.org", "forwarded": 'for="6.6.6.6;host=evil.example'}
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        two_proxies(server, "forwarded-line") as edge,
        client_from(VISITOR) as client,
    ):
        client.get(edge.url + "/?rid=garbage", headers=garbage).raise_for_status()
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    assert hit.url == "https://www.example.org/?rid=garbage"


def test_uvicorn_proxy_headers_rewrite_the_client(collector: Collector, tmp_path: Path) -> None:
    """uvicorn's own --proxy-headers handling: the app, and so the middleware, see the visitor."""
    extra = ("--proxy-headers", "--forwarded-allow-ips", f"{EDGE},{INNER}")
    with (
        serve(APP, collector.tracking_url, tmp_path, options=options(), extra=extra) as server,
        two_proxies(server, "x-forwarded") as edge,
        client_from(VISITOR) as client,
    ):
        response = client.get(edge.url + "/?rid=uvicorn", headers={"host": "www.example.org"})
        assert response.text.split()[0] == VISITOR
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    # uvicorn rewrites the client and the scheme; it leaves Host alone (no X-Forwarded-Host).
    assert hit.url == f"https://{host_of(server)}/?rid=uvicorn"


# --- IPv6 and anonymisation --------------------------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_clients(collector: Collector, tmp_path: Path) -> None:
    opts = options(trusted_proxies=["::1"], forwarded_header="forwarded")
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts, host="::1") as server,
        httpx.Client(base_url=server.url) as client,
    ):
        client.get("/?rid=v6").raise_for_status()
        forwarded = {"forwarded": 'for="[2001:db8::7]:4711";proto=https;host="[2001:db8::1]:8443"'}
        client.get("/?rid=v6-proxied", headers=forwarded).raise_for_status()
        hits = {httpx.URL(h.url or "").params["rid"]: h for h in collector.wait_for_hits(2)}
    assert hits["v6"].visitor_ip == "::1"
    assert hits["v6"].url == f"http://[::1]:{server.port}/?rid=v6"
    assert hits["v6-proxied"].visitor_ip == "2001:db8::7"
    assert hits["v6-proxied"].url == "https://[2001:db8::1]:8443/?rid=v6-proxied"


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv4_clients_of_a_dual_stack_server(collector: Collector, tmp_path: Path) -> None:
    """hypercorn on [::] sees IPv4 peers as `::ffff:a.b.c.d`: matched and reported as IPv4."""
    opts = options(trusted_proxies=[INNER])
    with serve(
        APP, collector.tracking_url, tmp_path, kind="hypercorn", options=opts, host="::"
    ) as server:
        url = f"http://127.0.0.1:{server.port}"
        with client_from(VISITOR) as client:
            response = client.get(url + "/?rid=direct")
            assert response.text.split()[0] == f"::ffff:{VISITOR}"  # what the app sees
        with client_from(INNER) as client:
            forwarded = {"x-forwarded-for": "::ffff:198.51.100.7"}
            client.get(url + "/?rid=proxied", headers=forwarded).raise_for_status()
        hits = {httpx.URL(h.url or "").params["rid"]: h for h in collector.wait_for_hits(2)}
    assert hits["direct"].visitor_ip == VISITOR
    assert hits["proxied"].visitor_ip == "198.51.100.7"


@pytest.mark.parametrize(
    ("mask", "ipv4", "ipv6"),
    [
        (1, "198.51.100.0", "2001:db8:1:2::"),
        (2, "198.51.0.0", "2001:db8:1::"),
        (3, "198.0.0.0", "2001:d00::"),
    ],
)
def test_anonymize_ip_bytes(
    mask: int, ipv4: str, ipv6: str, collector: Collector, tmp_path: Path
) -> None:
    opts = options(trusted_proxies=[INNER], anonymize_ip_bytes=mask)
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        client_from(INNER, base_url=server.url) as client,
    ):
        client.get("/?rid=v4", headers={"x-forwarded-for": "198.51.100.77"})
        client.get("/?rid=v6", headers={"x-forwarded-for": "2001:db8:1:2:3:4:5:6"})
        hits = {httpx.URL(h.url or "").params["rid"]: h for h in collector.wait_for_hits(2)}
    assert hits["v4"].visitor_ip == ipv4
    assert hits["v6"].visitor_ip == ipv6
    assert all(h.params["cip"] == h.visitor_ip for h in hits.values())


# --- nginx, configured as docs/deployment.md shows --------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
NGINX_CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen};
        location / {{
            proxy_pass {upstream};
            proxy_bind {bind};
            proxy_set_header Host $host;
            {headers}
        }}
    }}
}}
"""


NGINX_X_FORWARDED = """
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
"""
# RFC 7239 written by nginx itself (it replaces whatever the visitor sent).
NGINX_FORWARDED = """
            proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\\"$host\\"";
"""


@contextlib.contextmanager
def nginx(tmp_path: Path, upstream: str, headers: str = NGINX_X_FORWARDED) -> Iterator[str]:
    """nginx on EDGE in front of `upstream`, connecting from INNER; yields its URL."""
    assert NGINX is not None
    port = free_port(EDGE)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp_path,
            listen=f"{EDGE}:{port}",
            upstream=upstream,
            bind=INNER,
            headers=headers.strip(),
        )
    )
    with (tmp_path / "nginx.out").open("wb") as out:
        process = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
            stdout=out,
            stderr=out,
        )
    try:
        wait_for_port(port, process, 10.0, EDGE)
        yield f"http://{EDGE}:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_nginx(collector: Collector, tmp_path: Path) -> None:
    opts = options(trusted_proxies=[INNER])
    spoofed = {"x-forwarded-for": "6.6.6.6", "x-forwarded-host": "evil.example"}
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        nginx(tmp_path, server.url) as url,
        client_from(VISITOR) as client,
    ):
        headers = {"host": "www.example.org", **spoofed}
        response = client.get(url + "/?rid=nginx", headers=headers)
        assert response.status_code == 200
        assert response.text.split()[0] == INNER  # the app's peer is nginx
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    assert hit.url == "http://www.example.org/?rid=nginx"  # no TLS at this nginx


# Appending to what the visitor sent, on the same line (no quotes in what nginx adds).
NGINX_FORWARDED_APPENDED = """
            proxy_set_header Forwarded "$http_forwarded, for=$remote_addr;proto=$scheme";
"""


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
@pytest.mark.parametrize("garbage", ['for="6.6.6.6', "for=6.6.6.6;for=6.6.6.7", "for=6.6.6.6 x"])
def test_behind_nginx_appending_to_a_malformed_forwarded_header(
    garbage: str, collector: Collector, tmp_path: Path
) -> None:
    """The visitor's malformed start of the line does not hide the element nginx appended."""
    opts = options(trusted_proxies=[INNER], forwarded_header="forwarded")
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        nginx(tmp_path, server.url, NGINX_FORWARDED_APPENDED) as url,
        client_from(VISITOR) as client,
    ):
        headers = {"host": "www.example.org", "forwarded": garbage}
        client.get(url + "/?rid=appended", headers=headers).raise_for_status()
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    assert hit.url == "http://www.example.org/?rid=appended"


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
@pytest.mark.parametrize("host", ["www.example.org", "www.example.org,for=6.6.6.6"])
def test_behind_nginx_writing_forwarded(host: str, collector: Collector, tmp_path: Path) -> None:
    """A comma in the quoted host (nginx accepts it in Host) does not split the element."""
    opts = options(trusted_proxies=[INNER], forwarded_header="forwarded")
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        nginx(tmp_path, server.url, NGINX_FORWARDED) as url,
        client_from(VISITOR) as client,
    ):
        headers = {"host": host, "forwarded": "for=6.6.6.7"}
        response = client.get(url + "/?rid=nginx", headers=headers)
        assert response.status_code == 200
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
    # A host with a comma is no host name: the request's own Host header is used.
    assert hit.url == f"http://{host if ',' not in host else host_of(server)}/?rid=nginx"


def test_a_quoted_host_with_a_comma_does_not_choose_the_visitor_ip(
    collector: Collector, tmp_path: Path
) -> None:
    """Each proxy quotes the Host it received; the visitor's comma stays inside the quotes."""
    opts = options(trusted_proxies=[EDGE, INNER], forwarded_header="forwarded")
    with (
        serve(APP, collector.tracking_url, tmp_path, options=opts) as server,
        two_proxies(server, "forwarded") as edge,
        client_from(VISITOR) as client,
    ):
        headers = {"host": "good.com, for=6.6.6.6"}
        client.get(edge.url + "/?rid=quoted", headers=headers).raise_for_status()
        hit = only_hit(collector)
    assert hit.visitor_ip == VISITOR
