"""The collector's live page in a real headless Chromium (Debian's package).

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages ending in a NUL byte on file descriptors 3 and 4), so no driver
package is needed. Skipped when `chromium` is not installed; `.ci/run` installs it.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware
from asgi_matomo._collector import Collector

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient and warns once, on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (apt-get install -y chromium; .ci/run does it)",
    ),
]

TIMEOUT = 30.0
TOKEN = "browser-token"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are above fd 4, so that they can be moved to 3 and 4."""
    ends = os.pipe()
    moved = (fcntl.fcntl(ends[0], fcntl.F_DUPFD, 10), fcntl.fcntl(ends[1], fcntl.F_DUPFD, 10))
    for end in ends:
        os.close(end)
    return moved


class Browser:
    """Headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        assert CHROMIUM is not None
        # Two pipes: commands to the browser, answers and events from it.
        self._commands_read, self._commands_write = _pipe()
        self._answers_read, self._answers_write = _pipe()
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--disable-default-apps", f"--user-data-dir={user_data_dir}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # The protocol wants the pipe on fds 3 and 4: a tiny launcher puts it there.
        launcher = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4);"
            " os.execv(sys.argv[3], sys.argv[3:])"
        )
        fds = [str(self._commands_read), str(self._answers_write)]
        self._process = subprocess.Popen(
            [sys.executable, "-c", launcher, *fds, CHROMIUM, *flags],
            pass_fds=(self._commands_read, self._answers_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(self._commands_read)
        os.close(self._answers_write)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one protocol command and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._commands_write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read_message()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result

    def _read_message(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self._answers_read], [], [], max(left, 0))
            if not readable:
                raise TimeoutError(f"no answer from Chromium within {TIMEOUT}s")
            chunk = os.read(self._answers_read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def open(self, url: str) -> None:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self._session = attached["sessionId"]
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_until(self, expression: str, what: str) -> Any:
        """Evaluate until the expression is truthy (the page refreshes every second)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what} within {TIMEOUT}s")
            time.sleep(0.05)  # polling a condition with a deadline

    def close(self) -> None:
        try:
            if self._process.poll() is None:
                self.send("Browser.close")
                self._process.wait(TIMEOUT)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._commands_write)
            os.close(self._answers_read)


def processes_using(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    profile = tmp_path / "chromium-profile"
    running = Browser(profile)
    try:
        yield running
    finally:
        running.close()
    # Chromium's helper processes (renderer, GPU, zygote) go away with it.
    deadline = time.monotonic() + TIMEOUT
    while (left := processes_using(str(profile))) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition with a deadline
    assert not left, f"Chromium processes left behind: {left}"


async def foo(request: Request) -> JSONResponse:
    request.scope["state"]["asgi_matomo"] = {"cvar": {"anything": "goes"}}
    return JSONResponse({"name": "foo"})


async def titled(request: Request) -> JSONResponse:
    # A page title taken from the visitor: attacker-controlled text.
    request.scope["state"]["asgi_matomo"] = {"action_name": request.query_params["t"]}
    return JSONResponse({}, status_code=404)


def tracked_app(collector: Collector) -> Starlette:
    return Starlette(
        routes=[Route("/foo", foo), Route("/titled", titled)],
        middleware=[
            Middleware(
                MatomoMiddleware,
                matomo_url=collector.tracking_url,
                idsite=1,
                access_token=TOKEN,
                route_details={"/foo": {"action_name": "Foo/foo", "e_c": "Foo", "e_a": "Play"}},
            )
        ],
    )


ROWS = "Array.from(document.querySelectorAll('#hits-body tr.hit'))"
CELLS = f"{ROWS}.map(tr => Array.from(tr.cells).map(td => td.textContent))"


def test_live_page_shows_hits_as_they_arrive(browser: Browser) -> None:
    with Collector(token=TOKEN) as collector:
        browser.open(collector.base_url + "/")
        browser.wait_until("document.readyState === 'complete'", "a loaded page")
        assert browser.evaluate(f"{ROWS}.length") == 0
        assert browser.evaluate("document.getElementById('state').textContent") == "live"

        # Real hits, sent by the middleware (direct mode: no lifespan) over HTTP.
        client = TestClient(tracked_app(collector))
        assert client.get("/foo?x=1").status_code == 200
        assert client.get("/titled", params={"t": HOSTILE}).status_code == 404
        collector.wait_for_hits(3)

        rows = browser.wait_until(f"{ROWS}.length === 3 && {CELLS}", "the three hits")
        hostile, event, page = rows  # newest first
        assert page[1:6] == ["pageview", "Foo/foo", "https://testserver/foo?x=1", "200", page[5]]
        assert page[5].isdigit()
        assert page[7] == "http_status_code=200, http_method=GET, anything=goes"
        assert event[1] == "event"
        assert event[6] == "Foo / Play"
        # The visitor's address is untouched text: TestClient's peer is no IP.
        assert page[8] == "0.0.0.0"
        # Attacker-controlled text is shown as text, never parsed as HTML: by the
        # script (the rows above) and by the server (the page as first served).
        assert hostile[2] == HOSTILE
        assert hostile[4] == "404"
        assert browser.evaluate(f"{ROWS}[0].cells[4].className") == "status-error"
        browser.send("Page.reload")
        browser.wait_until("document.readyState === 'complete'", "a reloaded page")
        assert browser.evaluate(f"{CELLS}[0][2]") == HOSTILE
        assert browser.evaluate("document.querySelectorAll('#hits-body img').length") == 0
        assert browser.evaluate("document.title") == "asgi-matomo collector"

        # The filter asks the collector again, on every keystroke.
        browser.evaluate(
            "const f = document.getElementById('filter');"
            " f.value = 'foo'; f.dispatchEvent(new Event('input'));"
        )
        browser.wait_until(f"{ROWS}.length === 2", "the filtered hits")
        assert browser.evaluate("document.getElementById('count').textContent") == "2"

        # The collector goes away: the page says so instead of showing stale data silently.
        collector.stop()
        state = browser.wait_until(
            "document.getElementById('state').className === 'offline'"
            " && document.getElementById('state').textContent",
            "the collector as unreachable",
        )
        assert state.startswith("collector unreachable")
