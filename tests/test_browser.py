"""The collector's live page in a real headless Chromium (Debian's package).

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages ending in a NUL byte on file descriptors 3 and 4), so no driver
package is needed. Skipped when `chromium` is not installed; `.ci/run` installs it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
# The documentation shows what this test sees (docs/local-development.md).
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
# Screenshots of a phone are cut after two screens or so.
MAX_SCREENSHOT_HEIGHT = 1800
# 2025-11-18 09:00:00 UTC: fixed hit times and server times keep the screenshots the
# same from run to run.
T0 = 1763456400


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

    def resize(self, width: int, height: int, *, mobile: bool) -> None:
        """Lay the page out as a screen `width` CSS pixels wide (a phone when `mobile`)."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        self.send("Emulation.setScrollbarsHidden", hidden=True)

    def screenshot(self, path: Path, width: int) -> None:
        """Write a PNG of the whole page (at most MAX_SCREENSHOT_HEIGHT pixels tall)."""
        height = min(self.evaluate("document.documentElement.scrollHeight"), MAX_SCREENSHOT_HEIGHT)
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = self.send(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        path.write_bytes(base64.b64decode(shot["data"]))

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


# Three visitors, as a browser would send them: the page groups their hits into visits.
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36"
)
VISITORS = {
    "203.0.113.7": {
        "user-agent": FIREFOX,
        "accept-language": "en-GB,en;q=0.9",
        "referer": "https://search.example/?q=running+shoes",
    },
    "198.51.100.23": {
        "user-agent": IPHONE,
        "accept-language": "fr-FR",
        "referer": "https://social.example/post/123",
    },
    "192.0.2.44": {"user-agent": CHROME, "accept-language": "de-DE"},
}
# (visitor, path, seconds after T0, server time in ms, status)
TRAFFIC = [
    ("203.0.113.7", "/", 0, 12),
    ("198.51.100.23", "/blog/how-to-choose-running-shoes", 10, 8),
    ("198.51.100.23", "/missing", 30, 3),
    ("203.0.113.7", "/products/shoes?color=red&size=42", 40, 35),
    ("203.0.113.7", "/cart/add?sku=shoe-42", 41, 21),
    ("203.0.113.7", "/checkout", 95, 120),
    ("192.0.2.44", "/account", 120, 22),
]
TITLES = {
    "/": "Home",
    "/blog/how-to-choose-running-shoes": "Blog: how to choose running shoes",
    "/products/shoes": "Products / Shoes",
    "/cart/add": "Cart",
    "/checkout": "Checkout",
    "/account": "Account",
}


def _stamped(request: Request, **overrides: Any) -> None:
    """The test's own times for the hit, so that every run draws the same page."""
    state = request.scope["state"].setdefault("asgi_matomo", {})
    state.update(overrides)
    state["cdt"] = T0 + int(request.headers["x-test-offset"])
    state["pf_srv"] = int(request.headers["x-test-pf-srv"])


async def page(request: Request) -> JSONResponse:
    overrides: dict[str, Any] = {}
    title = TITLES.get(request.url.path)
    if title is not None:
        overrides["action_name"] = title
    if request.url.path == "/account":
        overrides["uid"] = "alice@example.org"
        overrides["cvar"] = {"plan": "premium"}
    _stamped(request, **overrides)
    status = {"/checkout": 500, "/missing": 404}.get(request.url.path, 200)
    return JSONResponse({}, status_code=status)


async def titled(request: Request) -> JSONResponse:
    # A page title taken from the visitor: attacker-controlled text.
    _stamped(request, action_name=request.query_params["t"])
    return JSONResponse({}, status_code=404)


def tracked_app(collector: Collector) -> Starlette:
    return Starlette(
        routes=[Route("/titled", titled), Route("/{path:path}", page)],
        middleware=[
            Middleware(
                MatomoMiddleware,
                matomo_url=collector.tracking_url,
                idsite=1,
                access_token=TOKEN,
                custom_dimensions={"http_status_code": 3},
                route_details={"/cart/add": {"e_c": "Cart", "e_a": "add", "e_n": "shoe-42"}},
            )
        ],
    )


def visit(app: Starlette, ip: str, path: str, offset: int, pf_srv: int) -> int:
    """One request from a visitor's browser; returns the status."""
    client = TestClient(app, base_url="https://shop.example", client=(ip, 50000))
    headers = {**VISITORS[ip], "x-test-offset": str(offset), "x-test-pf-srv": str(pf_srv)}
    return int(client.get(path, headers=headers).status_code)


VISITS = "Array.from(document.querySelectorAll('article.visit'))"
# Each visit as the page shows it: its visitor's fields and its actions' head lines.
SHOWN = f"""{VISITS}.map((v) => ({{
  visitor: Object.fromEntries(Array.from(v.querySelectorAll('.visitor dt'),
    (dt) => [dt.textContent, dt.nextElementSibling.textContent])),
  actions: Array.from(v.querySelectorAll('.action'), (a) => ({{
    head: a.querySelector('.action-head').textContent.replace(/\\s+/g, ' ').trim(),
    url: a.querySelector('.url')?.textContent ?? null,
    event: a.querySelector('.event')?.textContent ?? null,
    vars: Array.from(a.querySelectorAll('.vars li'), (li) => li.textContent),
  }})),
}}))"""
# Words (runs of non-space) that the layout splits over two lines. A URL or value
# wider than its box may break anywhere (`overflow-wrap: anywhere` on `.wrap` only);
# nothing else may.
SPLIT_WORDS = """(() => {
  const split = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("script, style")) { continue; }
    for (const match of node.data.matchAll(/\\S+/g)) {
      range.setStart(node, match.index);
      range.setEnd(node, match.index + match[0].length);
      const rects = Array.from(range.getClientRects()).filter((r) => r.width > 0);
      if (rects.length <= 1) { continue; }
      const width = rects.reduce((sum, r) => sum + r.width, 0);
      const box = node.parentElement.closest(".wrap");
      if (box && width > box.getBoundingClientRect().width) { continue; }
      split.push(match[0]);
    }
  }
  return split;
})()"""
OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"


def check_layout(browser: Browser, width: int, *, mobile: bool) -> None:
    browser.resize(width, 900, mobile=mobile)
    assert browser.wait_until(f"window.innerWidth === {width} && 'laid out'", "the new width")
    assert browser.evaluate(SPLIT_WORDS) == []
    assert browser.evaluate(OVERFLOW) == 0
    # The visitor's details sit beside the actions on a wide screen, above them on a phone.
    side_by_side = browser.evaluate(
        "(() => { const v = document.querySelector('.visitor').getBoundingClientRect();"
        " const a = document.querySelector('.actions').getBoundingClientRect();"
        " return v.right <= a.left && v.top === a.top; })()"
    )
    assert side_by_side is not mobile
    name = f"collector-visits-{width}.png"
    browser.screenshot(DOCS_IMG / name, width)
    assert f"](img/{name})" in (DOCS_IMG.parent / "local-development.md").read_text()


def test_visits_log(browser: Browser) -> None:
    with Collector(token=TOKEN, dimensions={3: "http_status_code"}) as collector:
        browser.open(collector.base_url + "/")
        browser.wait_until("document.readyState === 'complete'", "a loaded page")
        assert browser.evaluate(f"{VISITS}.length") == 0
        assert browser.evaluate("document.getElementById('state').textContent") == "live"

        # Real hits, sent by the middleware (direct mode: no lifespan) over HTTP.
        app = tracked_app(collector)
        statuses = [visit(app, *request) for request in TRAFFIC]
        assert statuses == [200, 200, 404, 200, 200, 500, 200]
        collector.wait_for_hits(8)  # the cart adds an event

        visits = browser.wait_until(
            f"{VISITS}.length === 3 && document.querySelectorAll('.action').length === 8"
            f" && {SHOWN}",
            "the three visits",
        )
        chrome, firefox, iphone = visits  # the most recently active first
        assert chrome["visitor"]["User ID"] == "alice@example.org"
        assert chrome["visitor"]["Browser"] == "Chrome 126.0"
        assert chrome["visitor"]["OS"] == "Windows 10"
        assert chrome["actions"][0]["vars"] == [
            "http_method GET",
            "plan premium",
            "http_status_code dimension3 200",
        ]
        # The middleware's own visitor id: a keyed hash of the day, site, IP and browser.
        assert re.fullmatch(r"[0-9a-f]{16} from cid", firefox["visitor"].pop("Visitor"))
        assert firefox["visitor"] == {
            "IP": "203.0.113.7",
            "Browser": "Firefox 128.0",
            "OS": "Linux",
            "Language": "en-GB,en;q=0.9",
            "Referrer": "https://search.example/?q=running+shoes",
        }
        # One visitor's five hits are one visit, in the order they happened.
        assert [action["head"] for action in firefox["actions"]] == [
            "09:00:00 page view Home 200 12 ms",
            "09:00:40 page view Products / Shoes 200 35 ms",
            "09:00:41 page view Cart 200 21 ms",
            "09:00:41 event 200",
            "09:01:35 page view Checkout 500 120 ms",
        ]
        assert (
            firefox["actions"][1]["url"] == "https://shop.example/products/shoes?color=red&size=42"
        )
        assert firefox["actions"][3]["event"] == "Event Cart / add / shoe-42"
        # The status travels as a custom dimension: shown by name, and as the status.
        assert "http_status_code dimension3 500" in firefox["actions"][4]["vars"]
        checkout = f"{VISITS}[1].querySelectorAll('.action')[4]"
        assert browser.evaluate(f"{checkout}.querySelector('.status').className") == (
            "status status-error"
        )
        assert iphone["visitor"]["Browser"] == "Mobile Safari 17.4"
        assert iphone["visitor"]["OS"] == "iOS 17.4, iPhone"
        assert [action["head"] for action in iphone["actions"]] == [
            "09:00:10 page view Blog: how to choose running shoes 200 8 ms",
            "09:00:30 page view /missing 404 3 ms",
        ]

        check_layout(browser, 1280, mobile=False)
        check_layout(browser, 390, mobile=True)

        # Every raw parameter is one click away, and stays open across refreshes.
        # Firefox's visit, found by its IP: the hostile hit below may start a visit of
        # its own (it carries a cid where the visit before it carried a uid).
        raw = (
            f"{VISITS}.find((v) => v.textContent.includes('203.0.113.7')).querySelector('details')"
        )
        assert browser.evaluate(f"{raw}.open") is False
        browser.evaluate(f"{raw}.querySelector('summary').click()")
        assert browser.evaluate(f"{raw}.open") is True
        assert browser.evaluate(SPLIT_WORDS) == []
        assert browser.evaluate(OVERFLOW) == 0
        params = browser.evaluate(
            f"Array.from({raw}.querySelectorAll('dt'), (dt) => dt.textContent)"
        )
        assert {"idsite", "url", "action_name", "ua", "lang", "cip", "dimension3"} <= set(params)
        assert "token_auth" not in params

        # Attacker-controlled text is shown as text, never parsed as HTML: by the
        # server (the page as first served) and in what the script swaps in.
        assert visit(app, "192.0.2.44", "/titled?t=" + quote(HOSTILE), 130, 1) == 404
        browser.wait_until(
            "document.querySelectorAll('.action').length === 9",
            "the hostile hit",
        )
        assert browser.evaluate(f"{raw}.open") is True
        title = f"{VISITS}[0].querySelector('.action:last-child .title').textContent"
        assert browser.evaluate(title) == HOSTILE
        browser.send("Page.reload")
        browser.wait_until("document.readyState === 'complete'", "a reloaded page")
        assert browser.evaluate(title) == HOSTILE
        assert browser.evaluate("document.querySelectorAll('main img').length") == 0
        assert browser.evaluate("document.title") == "asgi-matomo collector"

        # A value longer than a phone's screen breaks where it must, and nothing overflows.
        assert visit(app, "192.0.2.44", "/titled?t=" + "W" * 300, 140, 1) == 404
        browser.wait_until("document.querySelectorAll('.action').length === 10", "the long title")
        assert browser.evaluate(SPLIT_WORDS) == []
        assert browser.evaluate(OVERFLOW) == 0

        # The filter asks the collector again, on every keystroke, and is kept in the
        # address: a reload shows the same visits.
        browser.evaluate(
            "const f = document.getElementById('filter');"
            " f.value = 'shoes'; f.dispatchEvent(new Event('input'));"
        )
        browser.wait_until(f"{VISITS}.length === 2", "the filtered visits")
        assert browser.evaluate("location.search") == "?q=shoes"
        browser.send("Page.reload")
        browser.wait_until("document.readyState === 'complete'", "a reloaded page")
        assert browser.evaluate("document.getElementById('filter').value") == "shoes"
        assert browser.evaluate(f"{VISITS}.length") == 2
        assert browser.evaluate("document.getElementById('summary').textContent") == (
            "2 visits, 7 actions matching “shoes”, newest visit first"
        )

        # The collector goes away: the page says so instead of showing stale data silently.
        collector.stop()
        state = browser.wait_until(
            "document.getElementById('state').className === 'offline'"
            " && document.getElementById('state').textContent",
            "the collector as unreachable",
        )
        assert state.startswith("collector unreachable")
