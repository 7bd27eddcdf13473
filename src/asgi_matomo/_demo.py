"""`asgi-matomo demo`: an instrumented app, realistic traffic, and what Matomo received.

The demo runs a local Matomo stand-in (the collector) in this process and an
example app (`_demo_app`) under uvicorn in a subprocess, the way users run
their apps, and shows what the collector received. Uvicorn and Starlette are
not dependencies of the library: the demo checks for them and says how to
install them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx

from asgi_matomo._collector import Collector, StoredHit
from asgi_matomo._collector._page import COLUMNS, cells
from asgi_matomo._collector._serve import terminate_on_sigterm
from asgi_matomo._config import tracking_endpoint
from asgi_matomo._demo_app import (
    ENV_IDSITE,
    ENV_STATS,
    ENV_TOKEN,
    ENV_URL,
    HOST,
    Visit,
    traffic,
)

if TYPE_CHECKING:
    import argparse

__all__ = ["REQUIREMENTS", "run_demo"]

DEMO_SITE = 12345
DEMO_SITES = (1, DEMO_SITE)
# What the app needs and the library does not depend on (the dev extra has both).
REQUIREMENTS = ("uvicorn", "starlette")
INSTALL_HINT = "pip install uvicorn starlette (from a clone: pip install '.[demo]')"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
HITS_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0
# Uvicorn re-raises the signal it stopped on once its shutdown is complete.
CLEAN_EXIT = frozenset({0, -signal.SIGTERM, -signal.SIGINT})
PROGRESS_WIDTH = 30
CELL_WIDTHS = (8, 8, 18, 42, 6, 6, 24, 56, 15)


class DemoError(Exception):
    """The demo could not run; the message says why and what to do."""


def missing_requirements() -> list[str]:
    return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


@dataclass
class _App:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM (the sender flushes), then wait; killed only if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def _run_app(env: dict[str, str], workdir: Path) -> Iterator[_App]:
    # uvicorn serves a socket bound here: no race for a "free" port.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        log_path = workdir / "app.log"
        command = [
            sys.executable, "-m", "uvicorn", "asgi_matomo._demo_app:create_app", "--factory",
            "--fd", str(listener.fileno()), "--no-proxy-headers", "--no-access-log",
            "--log-level", "warning",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(listener.fileno(),),
                # Its own session: Ctrl-C in the terminal reaches the demo only,
                # which then stops the app with one SIGTERM. A second signal
                # would make uvicorn exit before the sender has flushed.
                start_new_session=True,
            )
    finally:
        listener.close()
    app = _App(process, f"http://{HOST}:{port}", log_path)
    try:
        yield app
    finally:
        app.stop()


def _wait_until_ready(app: _App, client: httpx.Client) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if app.process.poll() is not None:
            raise DemoError(
                f"the example app exited with {app.process.returncode} before serving:\n"
                + app.log_tail()
            )
        try:
            client.get(app.url + "/health", timeout=1.0)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the example app did not answer within {START_TIMEOUT:g}s:\n" + app.log_tail()
                ) from None
            # Polling a starting server with a deadline.
            time.sleep(0.05)
        else:
            return


def _progress(out: TextIO, done: int, total: int, *, live: bool) -> None:
    if not live and done != total:
        return
    filled = PROGRESS_WIDTH * done // total
    bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
    end = "\n" if done == total else ""
    out.write(f"\r  requests [{bar}] {done}/{total}{end}")
    out.flush()


def send_traffic(app_url: str, visits: Sequence[Visit], out: TextIO) -> list[tuple[Visit, int]]:
    """Send the visits one by one with a progress bar; returns each status code."""
    live = out.isatty()
    answered = []
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        _progress(out, 0, len(visits), live=live)
        for done, visit in enumerate(visits, 1):
            response = client.get(app_url + visit.path, headers=visit.headers)
            answered.append((visit, response.status_code))
            _progress(out, done, len(visits), live=live)
    return answered


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(hits: Sequence[StoredHit], base_url: str) -> str:
    """What the collector stored, one row per hit, as the collector's page shows it."""
    rows = []
    for hit in hits:
        row = cells(hit.to_json())
        row[0] = row[0][11:]  # the time of day: the date is today's
        if row[3].startswith(base_url):
            row[3] = row[3][len(base_url) :] or "/"
        rows.append([_fit(value, width) for value, width in zip(row, CELL_WIDTHS, strict=True)])
    header = [name.removesuffix(" (UTC)") for name in COLUMNS]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * width for width in widths),
    ]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def format_stats(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "  (the app did not report its counters: see its log)"
    names = ("submitted", "sent", "invalid", "rejected", "dropped", "retried", "batches")
    line = "  " + "  ".join(f"{name}={stats.get(name)}" for name in names)
    if stats.get("token_rejected"):
        line += "\n  Matomo rejected the token: visitor IPs were not sent."
    return line


def _read_stats(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summary_of_requests(answered: Sequence[tuple[Visit, int]]) -> str:
    counts: dict[int, int] = {}
    for _, status in answered:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} x {status}" for status, n in sorted(counts.items()))


def _wait_forever() -> None:
    print("  Ctrl-C stops both.", flush=True)
    forever = threading.Event()
    with terminate_on_sigterm(), _interrupt_on_sighup(), contextlib.suppress(KeyboardInterrupt):
        forever.wait()


@contextlib.contextmanager
def _interrupt_on_sighup() -> Iterator[None]:
    """A closed terminal stops the demo the way Ctrl-C does: the app is not left behind."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGHUP, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def run_demo(
    *,
    keep: bool = False,
    matomo_url: str | None = None,
    idsite: int | None = None,
    token: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the demo; returns the exit code. See the module docstring."""
    out = out or sys.stdout
    missing = missing_requirements()
    if missing:
        print(
            f"error: the demo runs an example app that needs {' and '.join(missing)},"
            f" which asgi-matomo does not depend on. Install them: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
    try:
        if matomo_url is None:
            return _demo_local(keep, out)
        return _demo_remote(matomo_url, idsite, token, keep, out)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _demo_local(keep: bool, out: TextIO) -> int:
    token = "demo-token-" + os.urandom(8).hex()
    visits = traffic()
    expected = sum(visit.expected_hits for visit in visits)
    with (
        Collector(token=token, sites=DEMO_SITES) as collector,
        tempfile.TemporaryDirectory(prefix="asgi-matomo-demo-") as workdir,
    ):
        stats_path = Path(workdir) / "stats.json"
        env = {
            ENV_URL: collector.tracking_url,
            ENV_IDSITE: str(DEMO_SITE),
            ENV_TOKEN: token,
            ENV_STATS: str(stats_path),
        }
        print(f"asgi-matomo demo: local Matomo stand-in at {collector.base_url}/", file=out)
        with _run_app(env, Path(workdir)) as app:
            _start(app, out)
            answered = send_traffic(app.url, visits, out)
            print(f"  answers: {_summary_of_requests(answered)}", file=out)
            if keep:
                collector.wait_for_hits(expected, HITS_TIMEOUT)
                print(format_table(collector.hits(), app.url), file=out)
                print(f"\nThe collector's page: {collector.base_url}/", file=out)
                print(f"The example app:      {app.url}/  (try /foo, /players/you)", file=out)
                out.flush()
                _wait_forever()
            # SIGTERM, as a process manager stops an app: the sender flushes.
            code = app.stop()
        stats = _read_stats(stats_path)
        if code not in CLEAN_EXIT:
            raise DemoError(f"the example app exited with {code}:\n{app.log_tail()}")
        try:
            hits = collector.wait_for_hits(expected, HITS_TIMEOUT)
        except TimeoutError as exc:
            raise DemoError(f"{exc}\n{format_stats(stats)}") from None
        if keep:
            print(f"\nStopped. What the sender reported:\n{format_stats(stats)}", file=out)
            return 0
        print(
            f"\nWhat Matomo received: {len(hits)} hits from {len(answered)} requests"
            f" (URLs relative to {app.url}; /health is excluded; an event is a hit"
            " of its own):\n",
            file=out,
        )
        print(format_table(hits, app.url), file=out)
        print(
            f"\nWhat the sender reported after the app shut down:\n{format_stats(stats)}", file=out
        )
        print(
            "\nRun `asgi-matomo demo --keep` to browse them on the collector's page,"
            " or `asgi-matomo collector` and point your own app at it.",
            file=out,
        )
    return 0


def _demo_remote(
    matomo_url: str, idsite: int | None, token: str | None, keep: bool, out: TextIO
) -> int:
    if idsite is None:
        raise DemoError("--matomo-url needs --idsite: the site the demo's hits belong to")
    try:
        endpoint = tracking_endpoint(matomo_url)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    visits = traffic()
    with tempfile.TemporaryDirectory(prefix="asgi-matomo-demo-") as workdir:
        stats_path = Path(workdir) / "stats.json"
        env = {ENV_URL: endpoint, ENV_IDSITE: str(idsite), ENV_STATS: str(stats_path)}
        if token:
            env[ENV_TOKEN] = token
        print(f"asgi-matomo demo: sending to {endpoint} (site {idsite})", file=out)
        with _run_app(env, Path(workdir)) as app:
            _start(app, out)
            answered = send_traffic(app.url, visits, out)
            print(f"  answers: {_summary_of_requests(answered)}", file=out)
            if keep:
                print(f"The example app: {app.url}/", file=out)
                out.flush()
                _wait_forever()
            code = app.stop()
        stats = _read_stats(stats_path)
        if code not in CLEAN_EXIT:
            raise DemoError(f"the example app exited with {code}:\n{app.log_tail()}")
    print(
        "\nThis Matomo is not the local stand-in: the demo cannot read back what it stored."
        f" Look at Visitors > Visits Log of site {idsite}. What was sent:\n",
        file=out,
    )
    for visit, status in answered:
        print(f"  {status}  GET {visit.path}", file=out)
    print(f"\nWhat the sender reported after the app shut down:\n{format_stats(stats)}", file=out)
    if stats is None or stats.get("sent", 0) == 0:
        print(_nothing_stored(stats, matomo_url, idsite, token), file=out)
        return 1
    return 0


def _nothing_stored(
    stats: dict[str, Any] | None, matomo_url: str, idsite: int, token: str | None
) -> str:
    """What to run when a real Matomo took none of the demo's hits."""
    if stats is None:
        counted = ""
    else:
        lost = ("invalid", "rejected", "dropped")
        counted = ", ".join(f"{stats[name]} counted {name}" for name in lost if stats.get(name))
        counted = f" of the {stats.get('submitted', 0)} hits" + (f" ({counted})" if counted else "")
    command = f"asgi-matomo check --matomo-url {matomo_url} --idsite {idsite}"
    if token:
        command += " --token <token>"
    return (
        f"\nMatomo stored none{counted}: run `{command}` to see why (a site id Matomo"
        " does not have, a token it refuses, a tracker it does not answer on)."
    )


def _start(app: _App, out: TextIO) -> None:
    with httpx.Client() as client:
        _wait_until_ready(app, client)
    print(f"  example app (uvicorn, pid {app.process.pid}) at {app.url}/", file=out)
    out.flush()


def run_from_args(args: argparse.Namespace) -> int:
    """The `demo` subcommand's handler."""
    return run_demo(
        keep=args.keep, matomo_url=args.matomo_url, idsite=args.idsite, token=args.token
    )
