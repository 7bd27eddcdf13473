"""Writes a report once an app has shut down: the demo's and the benchmarks' counters.

Both run the app under uvicorn in a subprocess and read, after it exits, what
its sender did. `MatomoMiddleware` closes its sender (flushing every hit)
before it passes `lifespan.shutdown.complete` on: counters read then are final.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

    from asgi_matomo._report import Stats
    from asgi_matomo._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ReportOnShutdown", "stats_report"]


class ReportOnShutdown:
    """Wraps `app`: writes `report()` as JSON to `path` when its shutdown completes."""

    def __init__(
        self, app: ASGIApp, path: str | os.PathLike[str], report: Callable[[], object]
    ) -> None:
        self.app = app
        self.path = Path(path)
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_and_report(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self.path.write_text(json.dumps(self.report()))
            await send(message)

        await self.app(scope, receive, send_and_report)


def stats_report(stats: Stats) -> dict[str, object]:
    """The sender's counters as a JSON-ready dict."""
    return dataclasses.asdict(stats)
