"""`asgi-matomo demo`: end to end as the command a newcomer runs, and its parts."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from asgi_matomo import _demo, _demo_app
from asgi_matomo._cli import main
from asgi_matomo._collector import Collector
from tests.servers import ROOT

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient and warns once, on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.slow

DEMO_TIMEOUT = 60.0
TOKEN = "demo-test-token"


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "asgi_matomo", "demo", *args]


def pid_of_app(output: str) -> int:
    match = re.search(r"example app \(uvicorn, pid (\d+)\)", output)
    assert match is not None, output
    return int(match.group(1))


def assert_gone(pid: int) -> None:
    """The process is neither running nor a zombie waiting for its parent."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        state = stat.read_text().rpartition(")")[2].split()[0]
        assert state in ("Z", "X"), f"process {pid} is still running (state {state})"
    else:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def assert_nothing_listens(url: str) -> None:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 1):
        pass


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", line)]


def check_table(output: str) -> None:
    rows = table_rows(output)
    assert len(rows) == 48, output
    assert any("pageview  Foo/foo" in row and " 200 " in row for row in rows)
    assert any("event" in row and "Foo / Playing" in row for row in rows)
    assert any("Players / Viewed / ana" in row for row in rows)
    assert any("player=bo" in row for row in rows)
    assert any("/fail" in row and " 500 " in row for row in rows)
    assert any("(not found)" in row and " 404 " in row for row in rows)
    assert not any("/health" in row for row in rows)  # excluded
    # The visitors' addresses, from X-Forwarded-For of a trusted proxy (cip).
    assert any(row.rstrip().endswith("2001:db8::7") for row in rows)
    assert "sent=48" in output
    assert "dropped=0" in output


def read_until(process: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """Read the process's stdout until `marker` shows up, with a deadline."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    text = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in text:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{marker!r} not printed within {timeout}s:\n{text.decode()}")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the demo exited early:\n{text.decode()}")
            text += chunk
    return text.decode()


def test_demo_as_a_command() -> None:
    result = subprocess.run(
        demo_command(), cwd=ROOT, capture_output=True, text=True, timeout=DEMO_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    check_table(output)
    assert "36/36" in output  # the progress bar's last state
    assert "answers: 30 x 200, 3 x 404, 3 x 500" in output
    assert_gone(pid_of_app(output))
    collector_url = re.search(r"stand-in at (\S+)", output)
    app_url = re.search(r"at (http://\S+)/\n", output)
    assert collector_url is not None
    assert app_url is not None
    assert_nothing_listens(collector_url.group(1))
    assert_nothing_listens(app_url.group(1))
    # The failing route's traceback goes to the app's log, not to the user's screen.
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sighup"])
def test_demo_keep_until_interrupted(how: str) -> None:
    process = subprocess.Popen(
        demo_command("--keep"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a terminal of its own, for Ctrl-C
    )
    try:
        output = read_until(process, "Ctrl-C stops both.", DEMO_TIMEOUT)
        page = re.search(r"The collector's page: (\S+)", output)
        app = re.search(r"The example app: +(\S+)", output)
        assert page is not None
        assert app is not None
        check_table(output.replace("sent=48", "").replace("dropped=0", "") + "sent=48 dropped=0")
        with httpx.Client() as client:
            assert "Foo/foo" in client.get(page.group(1)).text
            # Still tracking: one more page view and its event.
            assert client.get(app.group(1) + "foo").json() == {"name": "foo"}
        if how == "ctrl-c":
            # A terminal sends SIGINT to its whole foreground process group; the
            # app has a session of its own and is stopped by the demo, once.
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
        stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if process.poll() is None:  # pragma: no cover - only when the test failed
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr.decode()
    rest = stdout.decode()
    assert "Stopped." in rest
    assert "sent=50" in rest  # the 48 and the extra page view with its event
    assert_gone(pid_of_app(output))
    assert_nothing_listens(page.group(1))
    assert_nothing_listens(app.group(1))


def test_demo_in_process() -> None:
    out = io.StringIO()
    assert _demo.run_demo(out=out) == 0
    check_table(out.getvalue())


def test_demo_against_another_matomo() -> None:
    """With --matomo-url the demo cannot read the hits back: it says so and shows stats."""
    out = io.StringIO()
    with Collector(token=TOKEN, sites=[7]) as matomo:
        code = _demo.run_demo(matomo_url=matomo.base_url, idsite=7, token=TOKEN, out=out)
        hits = matomo.wait_for_hits(48)
    assert code == 0, out.getvalue()
    output = out.getvalue()
    assert "cannot read back what it stored" in output
    assert "500  GET /fail" in output
    assert "sent=48" in output
    assert {hit.idsite for hit in hits} == {7}
    assert {hit.visitor_ip for hit in hits} >= {"2001:db8::7", "203.0.113.10"}
    # Several visitors, each with one address, browser and language: Matomo
    # (and the stand-in's page) groups their hits into one visit each.
    visitors = {(hit.visitor_ip, hit.ua, hit.lang) for hit in hits}
    assert visitors == set(_demo_app.VISITORS)


def test_demo_against_another_matomo_that_refuses_everything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Collector(sites=[7]) as matomo:
        # An unknown site: Matomo counts every hit invalid, nothing is sent.
        assert main(["demo", "--matomo-url", matomo.base_url, "--idsite", "3"]) == 1
    assert "invalid=48" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--matomo-url", "http://127.0.0.1:9"], "--matomo-url needs --idsite"),
        (["--matomo-url", "matomo.example.org", "--idsite", "1"], "must be an http(s) URL"),
    ],
)
def test_demo_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 1
    assert message in capsys.readouterr().err


def test_demo_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str) -> object:
        return None if name == "uvicorn" else real_find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "needs uvicorn" in err
    assert "pip install uvicorn starlette" in err


def test_demo_reports_an_app_that_cannot_start(tmp_path: Path) -> None:
    # An idsite that is not a number: the app's factory fails in the subprocess.
    env = {_demo_app.ENV_URL: "http://matomo.invalid", _demo_app.ENV_IDSITE: "x"}
    with (
        _demo._run_app(env, tmp_path) as app,
        pytest.raises(_demo.DemoError, match="exited with"),
    ):
        _demo._start(app, io.StringIO())


def test_demo_app_reports_its_stats(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stats_path = tmp_path / "stats.json"
    with Collector(token=TOKEN, sites=[_demo.DEMO_SITE]) as matomo:
        monkeypatch.setenv(_demo_app.ENV_URL, matomo.tracking_url)
        monkeypatch.setenv(_demo_app.ENV_IDSITE, str(_demo.DEMO_SITE))
        monkeypatch.setenv(_demo_app.ENV_TOKEN, TOKEN)
        monkeypatch.setenv(_demo_app.ENV_STATS, str(stats_path))
        with TestClient(_demo_app.create_app(), raise_server_exceptions=False) as client:
            for visit in _demo_app.traffic(len(_demo_app.PAGES)):
                client.get(visit.path, headers=visit.headers)
            assert not stats_path.exists()
        stats = json.loads(stats_path.read_text())
        hits = matomo.wait_for_hits(stats["sent"])
    assert stats["sent"] == len(hits) == sum(v.expected_hits for v in _demo_app.traffic(12))
    assert stats["dropped"] == 0


def test_demo_app_without_stats_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_demo_app.ENV_URL, "http://matomo.invalid")
    monkeypatch.setenv(_demo_app.ENV_IDSITE, "1")
    monkeypatch.delenv(_demo_app.ENV_STATS, raising=False)
    monkeypatch.delenv(_demo_app.ENV_TOKEN, raising=False)
    from asgi_matomo import MatomoMiddleware

    assert isinstance(_demo_app.create_app(), MatomoMiddleware)


def test_traffic_covers_every_page() -> None:
    visits = _demo_app.traffic()
    assert len(visits) == _demo_app.REQUESTS
    assert {v.path for v in visits} == {path for path, _ in _demo_app.PAGES}
    assert len({v.headers["User-Agent"] for v in visits}) > 3
    assert len({v.headers["Accept-Language"] for v in visits}) > 3
    assert any("Referer" in v.headers for v in visits)
    assert any("Referer" not in v.headers for v in visits)
    # Every made-up visitor comes back several times, always the same person.
    seen = {
        (v.headers["X-Forwarded-For"], v.headers["User-Agent"], v.headers["Accept-Language"])
        for v in visits
    }
    assert seen == set(_demo_app.VISITORS)
    assert len(seen) >= 5
    for ip, _, _ in _demo_app.VISITORS:
        assert sum(v.headers["X-Forwarded-For"] == ip for v in visits) >= 3


def test_progress_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    for done in range(5):
        _demo._progress(out, done, 4, live=True)
    text = out.getvalue()
    assert text.count("\r") == 5
    assert text.endswith("4/4\n")


def test_stats_formatting() -> None:
    assert "did not report" in _demo.format_stats(None)
    assert "rejected the token" in _demo.format_stats({"sent": 1, "token_rejected": True})
