"""Shared pieces of the delivery benchmarks (issue 3); not a benchmark itself.

- `create_app`: the hello-world Starlette app uvicorn serves (`--factory`),
  bare, with `MatomoMiddleware`, or with a naive one-POST-per-request middleware;
  configured through `BENCH_*` environment variables.
- `CollectorProcess`: the local Matomo stand-in in its own process, so that it
  never competes with the app for its GIL.
- `ReceiverProcess`: a minimal bulk endpoint (raw asyncio) for measuring the
  sender's own CPU cost without the collector's SQLite work in the picture.
- `SerialReceiverProcess`: a bulk endpoint that serves one request at a time and
  takes a fixed time per hit: a Matomo whose answer time grows with the load.
- `realistic_scope`, `HEADERS`: what a browser sends, for the in-process tests.
- `machine_facts`, `percentile`: for the reports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware
from asgi_matomo._shutdown_report import ReportOnShutdown, stats_report

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from asgi_matomo._types import ASGIApp, Message, Receive, Scope, Send

HOST = "127.0.0.1"
# What a browser sends with a page request; wrk sends the same headers.
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
HEADERS: dict[str, str] = {
    "User-Agent": USER_AGENT,
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-GB,en;q=0.9,fr;q=0.8",
    "Referer": "https://www.example.org/search?q=asgi+matomo",
}


# -- the app under test ---------------------------------------------------------------

_served = 0
# Time the garbage collector spends, and how often it runs: allocation on the
# request path costs twice, once to allocate and again in the collector.
_gc = {"seconds": 0.0, "collections": 0, "gen2": 0}
_gc_started = 0.0


def _gc_callback(phase: str, info: Mapping[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    _gc["seconds"] += time.perf_counter() - _gc_started
    _gc["collections"] += 1
    _gc["gen2"] += info["generation"] == 2


async def _hello(request: Request) -> PlainTextResponse:
    global _served
    _served += 1
    return PlainTextResponse("Hello, world!")


class NaiveMatomo:
    """The old design, for comparison: one awaited POST to Matomo per request.

    Written for this benchmark (the PyPI package of the same name must never be
    installed next to ours). One shared client, the response already sent when
    the POST starts: the cost is the POST's CPU and the pool it waits for.
    """

    def __init__(self, app: ASGIApp, *, matomo_url: str) -> None:
        self.app = app
        self.url = matomo_url
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        params = {
            "idsite": "1",
            "rec": "1",
            "apiv": "1",
            "send_image": "0",
            "url": f"http://{headers.get('host', '')}{scope['path']}",
            "action_name": scope["path"],
            "ua": headers.get("user-agent", ""),
            "lang": headers.get("accept-language", ""),
        }
        if self.client is None:
            self.client = httpx.AsyncClient()
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(self.url, data=params)


# Comparison variants that are not the library: they track nothing.
NOT_THE_LIBRARY = ("floor", "passthrough")


class Passthrough:
    """A middleware that does nothing but call the app: not the library.

    The price of one more ASGI layer (a coroutine frame per request), which any
    middleware pays before it does anything.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Floor:
    """The least a tracking middleware can do, for comparison: not the library.

    Wraps `send` to see the status, takes two timestamps and keeps a reference
    to the request in a bounded list, which is all the request path must do.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.kept: collections.deque[tuple[Scope, int, float, float]] = collections.deque(
            maxlen=10_000
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.time()
        start = time.perf_counter()
        status = 0

        def send_and_watch(message: Message) -> Awaitable[None]:
            # As cheap as the library's own wrapper: a plain function handing back
            # the server's awaitable, no coroutine per message.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        await self.app(scope, receive, send_and_watch)
        self.kept.append((scope, status, started_at, time.perf_counter() - start))


def create_app() -> ASGIApp:
    """The app uvicorn serves: `BENCH_VARIANT` is bare, matomo, naive, floor or passthrough.

    `BENCH_MATOMO_URL` is the Matomo endpoint, `BENCH_SENDER` a JSON object of
    extra MatomoMiddleware options, `BENCH_REPORT` where to write the report.
    """
    gc.callbacks.append(_gc_callback)
    app: ASGIApp = Starlette(routes=[Route("/", _hello)])
    variant = os.environ.get("BENCH_VARIANT", "bare")
    url = os.environ.get("BENCH_MATOMO_URL", f"http://{HOST}:8765/matomo.php")
    middleware = None
    if variant == "matomo":
        options: dict[str, Any] = json.loads(os.environ.get("BENCH_SENDER", "{}"))
        app = middleware = MatomoMiddleware(app, matomo_url=url, idsite=1, **options)
    elif variant == "naive":
        app = NaiveMatomo(app, matomo_url=url)
    elif variant == "floor":
        app = Floor(app)
    elif variant == "passthrough":
        app = Passthrough(app)
    elif variant != "bare":
        raise ValueError(
            f"BENCH_VARIANT: bare, matomo, naive, floor or passthrough, got {variant!r}"
        )

    def report() -> dict[str, object]:
        stats = None if middleware is None else stats_report(middleware.stats)
        return {"served": _served, "gc": _gc, "stats": stats}

    return ReportOnShutdown(app, os.environ.get("BENCH_REPORT", os.devnull), report)


# -- helper processes -----------------------------------------------------------------


def pin(cpus: Sequence[int] | None) -> None:
    """Pin this process to `cpus` (Linux), when given."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))


def _collector_main(conn: Connection, cpus: Sequence[int] | None) -> None:
    from asgi_matomo._collector import Collector

    pin(cpus)
    with Collector(host=HOST) as collector:
        conn.send(collector.tracking_url)
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "fault":
                collector.set_fault(delay=arg)
            elif command == "clear":
                collector.clear_fault()
            # Exact, however many hits and requests the collector still keeps.
            totals = collector.totals()
            conn.send(
                {
                    "requests": totals.requests,
                    "elements": totals.elements,
                    "tracked": totals.tracked,
                    "invalid": totals.invalid,
                    "errors": totals.errors,
                }
            )
    conn.send(None)


class CollectorProcess:
    """The Collector (Matomo stand-in) in a child process, driven through a pipe."""

    def __init__(self, cpus: Sequence[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_collector_main, args=(child, cpus), daemon=True)
        self._proc.start()
        self.tracking_url: str = self._conn.recv()

    def _ask(self, command: str, arg: object = None) -> dict[str, int]:
        self._conn.send((command, arg))
        answer: dict[str, int] = self._conn.recv()
        return answer

    def counts(self) -> dict[str, int]:
        """Tracking requests received, bulk elements, hits tracked/invalid, non-2xx."""
        return self._ask("counts")

    def set_delay(self, seconds: float) -> None:
        """Answer every tracking request `seconds` late (0: healthy again)."""
        if seconds:
            self._ask("fault", seconds)
        else:
            self._ask("clear")

    def stop(self) -> None:
        self._conn.send(("stop", None))
        self._conn.recv()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """The body of the next request on a kept-alive connection (Content-Length only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


async def _answer_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            body = await _read_request(reader)
            tracked = body.count(b'"?')
            answer = b'{"status":"success","tracked":%d,"invalid":0}' % tracked
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _receiver_main(conn: Connection, cpus: Sequence[int] | None) -> None:
    pin(cpus)

    async def serve() -> None:
        server = await asyncio.start_server(_answer_bulk, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        conn.send(f"http://{HOST}:{port}/matomo.php")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)
        server.close()

    asyncio.run(serve())


class ReceiverProcess:
    """A minimal, fast Matomo bulk endpoint in a child process (answers `tracked`)."""

    def __init__(self, cpus: Sequence[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_receiver_main, args=(child, cpus), daemon=True)
        self._proc.start()
        self.tracking_url: str = self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


class _Serial:
    """One bulk request at a time, `per_hit` seconds per hit: a Matomo whose answer
    time grows with the load (each request waits for the ones before it)."""

    def __init__(self, per_hit: float) -> None:
        self.per_hit = per_hit
        self.lock = asyncio.Lock()
        self.counts = {"requests": 0, "elements": 0, "tracked": 0, "invalid": 0, "errors": 0}
        # Stored, but the answer could not be written: the sender had given up (a
        # timeout), so it will send the batch again (a duplicate).
        self.counts["abandoned"] = 0
        self.slowest = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                body = await _read_request(reader)
                tracked = body.count(b'"?')
                arrived = time.monotonic()
                async with self.lock:
                    await asyncio.sleep(self.per_hit * tracked)
                    self.counts["requests"] += 1
                    self.counts["elements"] += tracked
                    self.counts["tracked"] += tracked
                self.slowest = max(self.slowest, time.monotonic() - arrived)
                answer = b'{"status":"success","tracked":%d,"invalid":0}' % tracked
                if writer.is_closing() or reader.at_eof():
                    self.counts["abandoned"] += tracked
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the benchmark stops this stand-in
        finally:
            writer.close()


def _serial_main(conn: Connection, per_hit: float, cpus: Sequence[int] | None) -> None:
    pin(cpus)

    async def serve() -> None:
        serial = _Serial(per_hit)
        server = await asyncio.start_server(serial.handle, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        conn.send(f"http://{HOST}:{port}/matomo.php")
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) != "stop":
            conn.send({**serial.counts, "slowest_ms": int(serial.slowest * 1000)})
        server.close()
        conn.send(None)

    asyncio.run(serve())


class SerialReceiverProcess:
    """A bulk endpoint that serves one request at a time, `per_hit` seconds per hit."""

    def __init__(self, per_hit: float, cpus: Sequence[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serial_main, args=(child, per_hit, cpus), daemon=True)
        self._proc.start()
        self.tracking_url: str = self._conn.recv()

    def counts(self) -> dict[str, int]:
        """Requests, hits tracked, hits stored whose answer came too late, slowest answer."""
        self._conn.send("counts")
        answer: dict[str, int] = self._conn.recv()
        return answer

    def stop(self) -> None:
        self._conn.send("stop")
        self._conn.recv()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 180.0


@dataclass
class Server:
    """A uvicorn serving `create_app` in a child process."""

    variant: str
    port: int
    process: subprocess.Popen[bytes]
    report: Path
    log: Path


def start_uvicorn(
    variant: str,
    matomo_url: str,
    sender: Mapping[str, Any],
    cpus: str,
    directory: Path | None = None,
    stack: str = "h11",
    wrapper: Sequence[str] = (),
    startup_timeout: float = STARTUP_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start uvicorn (1 worker, no access log) on a free port; wait for it.

    `stack` is `h11` (h11 on asyncio: plain `pip install uvicorn`) or `standard`
    (httptools on uvloop: `pip install uvicorn[standard]`). `wrapper` is a command
    that runs the server (valgrind, for counting instructions); `env`, extra
    environment variables.
    """
    directory = directory or Path(tempfile.mkdtemp(prefix="bench-"))
    port = free_port()
    report = directory / f"{variant}-{port}.json"
    log = directory / f"{variant}-{port}.log"
    environment = {
        **os.environ,
        **(env or {}),
        "BENCH_VARIANT": variant,
        "BENCH_MATOMO_URL": matomo_url,
        "BENCH_SENDER": json.dumps(dict(sender)),
        "BENCH_REPORT": str(report),
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent)]
    command += ["--factory", "_common:create_app", "--host", HOST, "--port", str(port)]
    command += ["--workers", "1", "--no-access-log", "--log-level", "warning"]
    command += ["--loop", "uvloop", "--http", "httptools"] if stack == "standard" else [
        "--loop", "asyncio", "--http", "h11",
    ]  # fmt: skip
    command += ["--lifespan", "on"]
    command = [*wrapper, *command]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command, env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(variant, port, process, report, log)
    try:
        wait_for_port(port, startup_timeout, lambda: process.poll() is None)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return server


def stop_uvicorn(server: Server, sig: int = signal.SIGINT) -> dict[str, Any]:
    """Ctrl-C (or `sig`) the server (the sender flushes), wait for it, return its report."""
    process = server.process
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # uvicorn re-raises the signal it stopped on, once it has shut down cleanly.
    if process.returncode not in (0, -sig):
        raise RuntimeError(
            f"{server.variant}: uvicorn exited {process.returncode}: {server.log.read_text()}"
        )
    report: dict[str, Any] = json.loads(server.report.read_text())
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")


# -- realistic requests ---------------------------------------------------------------

# A browser's page request to the bench app, as raw HTTP/1.1 (wrk sends the same).
HTTP_REQUEST = (
    f"GET / HTTP/1.1\r\nHost: {HOST}\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in HEADERS.items())
    + "\r\n"
).encode()


async def get_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP_REQUEST on a keep-alive connection, its 200 answer read whole."""
    writer.write(HTTP_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"unexpected answer: {head[:80]!r}")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
            return
    raise RuntimeError(f"no content-length in {head!r}")


_PATHS = ("/", "/products/42", "/blog/2026/11/asgi-tracking", "/search", "/cart")


def realistic_scope(i: int) -> Scope:
    """The ASGI scope of a browser's page request (varied paths and queries)."""
    path = _PATHS[i % len(_PATHS)]
    query = f"page={i % 7}&utm_source=newsletter&utm_medium=email" if i % 2 else ""
    headers = [(b"host", b"shop.example.com")]
    headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
    headers += [(b"accept-encoding", b"gzip, deflate, br"), (b"connection", b"keep-alive")]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": headers,
        "client": ("203.0.113.7", 50000 + i % 10000),
        "server": ("10.0.0.5", 8000),
        "state": {},
    }


# -- reporting ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank on sorted values."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_facts() -> str:
    versions = ", ".join(
        f"{name} {version(name)}" for name in ("asgi-matomo", "starlette", "uvicorn", "httpx")
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"nproc {os.cpu_count()} ({cpu_model()}), {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; {versions}"
    )
