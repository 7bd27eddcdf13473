"""The `asgi-matomo` command: `check` against a collector, `collector` as a process."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import runpy
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import httpx
import pytest

import asgi_matomo._cli as cli
from asgi_matomo import __version__, _check
from asgi_matomo._check import check
from asgi_matomo._cli import main
from asgi_matomo._collector import Collector

TOKEN = "cli-token-0123456789"
WRONG = "not-the-token"


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(token=TOKEN, sites=(1, 3)) as running:
        yield running


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def run_check(url: str, idsite: int, token: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    return (0 if check(url, idsite, token, out=out) else 1), out.getvalue()


# -- URL handling --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("https://m.test", "https://m.test"),
        ("https://m.test/", "https://m.test"),
        ("https://m.test/matomo.php", "https://m.test"),
        ("https://m.test/analytics/piwik.php", "https://m.test/analytics"),
        ("https://m.test/analytics/index.php?x=1", "https://m.test/analytics"),
        (" http://m.test:8080/analytics/ ", "http://m.test:8080/analytics"),
    ],
)
def test_base_url(given: str, base: str) -> None:
    assert _check._base_url(given) == base


@pytest.mark.parametrize("given", ["m.test", "ftp://m.test", "https://"])
def test_not_an_http_url(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--matomo-url", given, "--idsite", "1"]) == 1
    assert "not an http(s) URL" in capsys.readouterr().out


# -- check against the collector -------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/matomo.php"])
def test_check_all_good(
    collector: Collector, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    url = collector.base_url + suffix
    assert main(["check", "--matomo-url", url, "--idsite", "3", "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert out.count("[ok]") == 4
    assert "All checks passed." in out
    assert TOKEN not in out
    # Nothing recorded: the tracker was only asked whether it answers.
    assert collector.hits() == []
    assert [(r.kind, r.has_token) for r in collector.requests] == [
        ("single", False),
        ("bulk", False),
    ]


def test_check_unknown_site(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check", "--matomo-url", collector.base_url, "--idsite", "2", "--token", TOKEN]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "[ok]   tracker:" in captured.out
    assert "[FAIL] site: site 2 does not exist" in captured.out
    assert "Invalid idSite" in captured.out
    assert "Some checks failed" in captured.err


def test_check_wrong_token(collector: Collector) -> None:
    code, out = run_check(collector.base_url, 1, WRONG)
    assert code == 1
    assert "[FAIL] token" in out
    assert "failed login" in out
    assert WRONG not in out


def test_check_without_token(collector: Collector) -> None:
    code, out = run_check(collector.base_url, 1)
    assert code == 0
    assert "[ok]   site: the tracker accepts site 1" in out
    assert "app server's IP" in out


def test_check_unreachable() -> None:
    code, out = run_check(f"http://127.0.0.1:{free_port()}", 1, TOKEN)
    assert code == 1
    assert "connection refused" in out


def test_check_https_to_a_plain_http_server(collector: Collector) -> None:
    code, out = run_check(collector.base_url.replace("http:", "https:"), 1, TOKEN)
    assert code == 1
    assert "TLS" in out


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"status": 404}, "not found (404)"),
        ({"status": 503}, "503"),
        ({"status": 500}, "HTTP 500"),
        ({"status": 302, "headers": {"Location": "https://elsewhere.test/"}}, "redirects"),
        ({"status": 200, "body": b"<html>a blog</html>"}, "not like a Matomo tracker"),
    ],
)
def test_check_tracker_answers_not_like_matomo(
    collector: Collector, fault: dict[str, Any], message: str
) -> None:
    collector.set_fault(**fault)
    code, out = run_check(collector.base_url, 1, TOKEN)
    assert code == 1
    assert message in out


# -- check against a mocked network ----------------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def matomo(api: Callable[[dict[str, str]], httpx.Response]) -> Handler:
    """A fake Matomo whose tracker is fine and whose reporting API is `api`."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/matomo.php"):
            if request.method == "POST":
                return httpx.Response(200, json={"status": "success", "tracked": 1})
            return httpx.Response(204)
        assert "token_auth" not in str(request.url)
        form = dict(httpx.QueryParams(request.content.decode()))
        return api(form)

    return handle


def mocked_check(handler: Handler, token: str | None = TOKEN) -> tuple[bool, str]:
    out = io.StringIO()
    ok = check(
        "https://m.test/matomo.php", 1, token, out=out, transport=httpx.MockTransport(handler)
    )
    return ok, out.getvalue()


SITE = {"idsite": "1", "name": "Shop", "main_url": "https://shop.test"}


@pytest.mark.parametrize(
    ("bulk", "ok", "message"),
    [
        (
            httpx.Response(204),
            True,
            "[ok]   bulk tracking: POST https://m.test/matomo.php accepts batches",
        ),
        (httpx.Response(200, content=b"GIF89a..."), True, "QueuedTracking"),
        (httpx.Response(413), False, "too large (413)"),
        (httpx.Response(405), False, "HTTP 405, not Matomo's JSON"),
        (httpx.Response(200, text="<html>"), False, "HTTP 200, not Matomo's JSON"),
        (httpx.Response(200, json={"status": "error"}), False, "HTTP 200, not Matomo's JSON"),
        (None, False, "[FAIL] bulk tracking: connection refused"),
    ],
)
def test_check_bulk_tracking(bulk: httpx.Response | None, ok: bool, message: str) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(204)
        assert json.loads(request.content) == {"requests": ["?idsite=1&send_image=0"]}
        if bulk is None:
            raise httpx.ConnectError("Connection refused")
        return bulk

    result, out = mocked_check(handle, token=None)
    assert result is ok
    assert message in out


def test_check_with_a_gif_answering_tracker() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"GIF89a...")

    ok, out = mocked_check(handle, token=None)
    assert ok
    assert "(200)" in out


@pytest.mark.parametrize(
    ("api", "message"),
    [
        (lambda form: httpx.Response(403), "HTTP 403"),
        (lambda form: httpx.Response(200, text="<html>login</html>"), "no JSON"),
        (lambda form: httpx.Response(200, json=["not", "a", "site"]), "unexpected answer"),
        (lambda form: httpx.Response(200, json={"idsite": "2"}), "unexpected answer"),
        (
            lambda form: httpx.Response(200, json={"result": "error", "message": "Oops"}),
            "Matomo answered an error: Oops",
        ),
        (
            lambda form: httpx.Response(200, json={"result": "error", "message": "log in"}),
            "not accepted",
        ),
        (
            lambda form: httpx.Response(
                401, json={"result": "error", "message": "Unable to authenticate with the token"}
            ),
            "not accepted",
        ),
        (lambda form: httpx.Response(500, json={"result": "success"}), "HTTP 500"),
    ],
)
def test_check_site_failures(api: Callable[[dict[str, str]], httpx.Response], message: str) -> None:
    ok, out = mocked_check(matomo(api))
    assert not ok
    assert message in out


def test_check_site_network_error() -> None:
    def api(form: dict[str, str]) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    ok, out = mocked_check(matomo(api))
    assert not ok
    assert "[FAIL] site: connection refused" in out


def site_then(admin: Callable[[], httpx.Response]) -> Handler:
    def api(form: dict[str, str]) -> httpx.Response:
        assert form["token_auth"] == TOKEN
        if form["method"] == "SitesManager.getSiteFromId":
            assert form["idSite"] == "1"
            return httpx.Response(200, json=SITE)
        return admin()

    return matomo(api)


def test_check_admin_access() -> None:
    ok, out = mocked_check(site_then(lambda: httpx.Response(200, json=["1", "5"])))
    assert ok
    assert "'Shop'" in out
    assert "cip is accepted" in out


@pytest.mark.parametrize(
    "admin",
    [
        lambda: httpx.Response(200, json=[]),
        lambda: httpx.Response(200, json={"result": "error", "message": "no"}),
    ],
)
def test_check_without_admin_access_is_not_verified(admin: Callable[[], httpx.Response]) -> None:
    ok, out = mocked_check(site_then(admin))
    assert not ok
    assert "NOT VERIFIED" in out
    assert "'write' role" in out


def test_check_admin_access_unreachable() -> None:
    def admin() -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    ok, out = mocked_check(site_then(admin))
    assert not ok
    assert "could not check the token's access level" in out


def with_cause(exc: httpx.HTTPError, cause: BaseException) -> httpx.HTTPError:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            with_cause(httpx.ConnectError("x"), ssl.SSLCertVerificationError(1, "bad cert")),
            "certificate of https://m.test/x not trusted",
        ),
        (
            with_cause(httpx.ConnectError("x"), ssl.SSLError(1, "wrong version")),
            "TLS handshake",
        ),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] nope"), "TLS error"),
        (httpx.ConnectTimeout("timed out"), "no answer from"),
        (
            httpx.ConnectError("[Errno -2] Name or service not known"),
            "cannot resolve host 'm.test'",
        ),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection refused"),
        (httpx.RemoteProtocolError("Server disconnected"), "cannot reach https://m.test/x"),
        (httpx.ReadError(""), "(ReadError)"),
    ],
)
def test_network_errors_are_explained(exc: httpx.HTTPError, message: str) -> None:
    assert message in _check._describe_error(exc, "https://m.test/x")


def test_check_network_error_on_tracker() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    ok, out = mocked_check(handle)
    assert not ok
    assert "DNS" in out


# -- the collector subcommand ----------------------------------------------------------


def read_line(process: subprocess.Popen[bytes], timeout: float = 20.0) -> bytes:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    assert readable, "the collector printed nothing"
    return process.stdout.readline()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_collector_subprocess(stop_signal: signal.Signals) -> None:
    port = free_port()
    command = [sys.executable, "-m", "asgi_matomo", "collector", "--port", str(port)]
    command += ["--token", TOKEN, "--sites", "1,2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            first = read_line(process)
            assert f"http://127.0.0.1:{port}/" in first.decode()
            with httpx.Client(timeout=10) as client:
                response = client.get(
                    f"http://127.0.0.1:{port}/matomo.php",
                    params={
                        "idsite": "2",
                        "rec": "1",
                        "url": "https://a.test/",
                        "cip": "1.2.3.4",
                        "token_auth": TOKEN,
                    },
                )
                assert response.status_code == 200
                hits = client.get(f"http://127.0.0.1:{port}/api/hits").json()
            assert [(hit["idsite"], hit["visitor_ip"]) for hit in hits] == [(2, "1.2.3.4")]
            process.send_signal(stop_signal)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:  # pragma: no cover - only when the test fails
                process.kill()
                process.wait()
        assert process.stderr is not None
        assert process.stderr.read() == b""


def test_collector_command_prints_the_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_serve(*args: Any, ready: Callable[[Collector], None], **kwargs: Any) -> None:
        calls.append((*args, kwargs))
        with Collector(port=0) as running:
            ready(running)

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert main(["collector", "--port", "0", "--db", "h.sqlite", "--sites", "1,2,"]) == 0
    options = {"queued_tracking": False, "dimensions": {}, "max_hits": 200_000}
    assert calls == [("127.0.0.1", 0, "h.sqlite", None, [1, 2], options)]
    out = capsys.readouterr().out
    assert "asgi-matomo collector: open http://127.0.0.1:" in out
    assert "/matomo.php" in out


def test_collector_command_dimension_names(monkeypatch: pytest.MonkeyPatch) -> None:
    options: list[dict[str, Any]] = []

    def fake_serve(*args: Any, ready: Callable[[Collector], None], **given: Any) -> None:
        options.append(given)

    monkeypatch.setattr(cli, "serve", fake_serve)
    argv = ["collector", "--dimension", "3=http_status_code", "--dimension", " 4 = http_method "]
    assert main(argv) == 0
    dimensions = {3: "http_status_code", 4: "http_method"}
    assert options == [{"queued_tracking": False, "dimensions": dimensions, "max_hits": 200_000}]


@pytest.mark.parametrize(("given", "max_hits"), [("50", 50), ("0", None)])
def test_collector_command_max_hits(
    monkeypatch: pytest.MonkeyPatch, given: str, max_hits: int | None
) -> None:
    options: list[dict[str, Any]] = []

    def fake_serve(*args: Any, ready: Callable[[Collector], None], **given: Any) -> None:
        options.append(given)

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert main(["collector", "--max-hits", given]) == 0
    assert options[0]["max_hits"] == max_hits


def test_collector_command_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["collector", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["collector", "--sites", "one"],
        ["collector", "--sites", "0"],
        ["collector", "--sites", ","],
        ["collector", "--dimension", "3"],
        ["collector", "--dimension", "three=status"],
        ["collector", "--dimension", "0=status"],
        ["collector", "--dimension", "3= "],
        ["collector", "--max-hits", "-1"],
        ["collector", "--max-hits", "many"],
        ["check", "--matomo-url", "https://m.test", "--idsite", "0"],
        ["check", "--matomo-url", "https://m.test", "--idsite", "x"],
        ["check", "--idsite", "1"],
        [],
    ],
)
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["asgi-matomo", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("asgi_matomo", run_name="__main__")
    assert exited.value.code == 0
    assert "collector" in capsys.readouterr().out


def test_importing_main_runs_nothing() -> None:
    module = importlib.import_module("asgi_matomo.__main__")
    assert module.main is main


def read_until(stream: IO[bytes] | None, marker: bytes, timeout: float = 20.0) -> bytes:
    """Read a process's unbuffered output until `marker` shows up, with a deadline."""
    assert stream is not None
    fd = stream.fileno()
    text = b""
    deadline = time.monotonic() + timeout
    while marker not in text:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{marker!r} not printed within {timeout}s: {text!r}")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 65536)
            assert chunk, f"the collector exited early: {text!r}"
            text += chunk
    return text


@pytest.mark.slow
def test_collector_without_options_takes_every_site_and_says_refusals() -> None:
    # Only --port 0 (any free port): the suite runs beside other servers.
    command = [sys.executable, "-m", "asgi_matomo", "collector", "--port", "0"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    ) as process:
        try:
            printed = read_until(process.stdout, b"Ctrl-C stops it.").decode()
            match = re.search(r"open (http://127\.0\.0\.1:\d+)/", printed)
            assert match is not None, printed
            base = match.group(1)
            assert "sites: every site" in printed
            with httpx.Client(timeout=10) as client:
                tracked = client.get(
                    f"{base}/matomo.php",
                    params={"idsite": "12345", "rec": "1", "url": "https://a.test/docs-example"},
                )
                refused = client.get(f"{base}/matomo.php", params={"rec": "1", "url": "x"})
                hits = client.get(f"{base}/api/hits").json()
                page = client.get(f"{base}/").text
            assert tracked.status_code == 200
            assert refused.status_code == 400
            assert [(hit["idsite"], hit["url"]) for hit in hits] == [
                (12345, "https://a.test/docs-example")
            ]
            assert "https://a.test/docs-example" in page
            said = read_until(process.stderr, b"idsite").decode()
            assert " WARNING " in said
            assert "refused a hit (400): a hit without idsite" in said
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:  # pragma: no cover - only when the test fails
                process.kill()
                process.wait()


def test_check_against_queued_tracking(capsys: pytest.CaptureFixture[str]) -> None:
    with Collector(token=TOKEN, sites=(1, 3), queued_tracking=True) as queued:
        assert main(["check", "--matomo-url", queued.base_url, "--idsite", "3"]) == 0
        out = capsys.readouterr().out
        assert queued.hits() == []
    assert "[ok]   tracker:" in out
    assert "[--]   QueuedTracking:" in out
    assert "Connection: close" in out
    assert "validates hits later" in out
    assert "'Number of requests to process at once' to 1" in out
    # A queued tracker accepts any idsite: only the reporting API can tell.
    assert "[--]   site: not checked" in out


def test_check_against_queued_tracking_with_token(capsys: pytest.CaptureFixture[str]) -> None:
    with Collector(token=TOKEN, sites=(1, 3), queued_tracking=True) as queued:
        args = ["check", "--matomo-url", queued.base_url, "--idsite", "3", "--token", TOKEN]
        assert main(args) == 0
        wrong_site = ["check", "--matomo-url", queued.base_url, "--idsite", "2", "--token", TOKEN]
        assert main(wrong_site) == 1
    out = capsys.readouterr().out
    assert "QueuedTracking" in out
    assert "cip is accepted" in out
    assert "site 2 does not exist" in out


def test_check_unknown_site_without_token(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--matomo-url", collector.base_url, "--idsite", "2"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] site: site 2 does not exist in this Matomo" in out
    assert "bulk" not in out
    # Probing records nothing.
    assert collector.hits() == []


def test_check_tracker_400_not_from_matomo() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="Bad Request")

    ok, out = mocked_check(handle, token=None)
    assert not ok
    assert "answers HTTP 400" in out


def test_check_tracker_400_then_unreachable() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.query:
            return httpx.Response(400)
        raise httpx.ConnectError("Connection refused")

    ok, out = mocked_check(handle, token=None)
    assert not ok
    assert "answers HTTP 400" in out


def test_check_bulk_counts_the_probe_invalid() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(204)
        return httpx.Response(200, json={"status": "success", "tracked": 0, "invalid": 1})

    ok, out = mocked_check(handle, token=None)
    assert not ok
    assert "counts the probe for site 1 invalid" in out
