"""An ASGI stand-in under uvicorn in a thread of the test process, on loopback.

For stand-ins whose state the test reads directly (what they stored, in which
order); the sender under test runs in the test's own event loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from tests.servers import free_port


@contextlib.contextmanager
def serve_in_thread(app: Any, *, timeout: float, log_level: str = "warning") -> Iterator[str]:
    """Run `app` until the block ends; yields its Matomo URL (`.../matomo.php`)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.02)  # polling a condition with a deadline
        yield f"http://127.0.0.1:{port}/matomo.php"
    finally:
        server.should_exit = True
        thread.join(timeout)


async def read_body(receive: Callable[[], Awaitable[Any]]) -> bytes:
    """The whole request body, however many messages it came in."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body
