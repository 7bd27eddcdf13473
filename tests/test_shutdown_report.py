"""The report written once an app has shut down (the demo's and the benchmarks')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asgi_matomo._report import Stats
from asgi_matomo._shutdown_report import ReportOnShutdown, stats_report
from asgi_matomo._types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


async def test_the_report_is_written_before_shutdown_completes(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    counted = {"served": 0}
    seen: list[tuple[str, bool]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            counted["served"] += 1
            return
        while True:
            message = await receive()
            kind = message["type"].replace("lifespan.", "")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return

    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        seen.append((message["type"], path.exists()))

    wrapped = ReportOnShutdown(app, path, lambda: dict(counted))
    await wrapped({"type": "http"}, receive, send)
    await wrapped({"type": "lifespan"}, receive, send)
    assert seen == [("lifespan.startup.complete", False), ("lifespan.shutdown.complete", True)]
    assert json.loads(path.read_text()) == {"served": 1}


def test_stats_report_has_every_counter() -> None:
    report = stats_report(Stats(submitted=3, sent=2, dropped=1, token_rejected=True))
    assert report["submitted"] == 3
    assert report["token_rejected"] is True
    assert set(report) == set(Stats.__dataclass_fields__)
    json.dumps(report)
