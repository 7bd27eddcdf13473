"""What the sender tells the user when hits cannot be delivered: the cause, and what to set.

Real sockets on loopback: a TLS server whose certificate is not trusted (for the
lean client and for a user's httpx client), and the Matomo stand-in answering 503
while the sender shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme

from asgi_matomo._collector import Collector
from asgi_matomo._hit import Hit
from asgi_matomo._http import LeanClient
from asgi_matomo._sender import BatchSender
from asgi_matomo._spool import SqliteSpool
from asgi_matomo._spool_guard import GuardedSpool

pytestmark = pytest.mark.anyio

DEADLINE = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def hits(n: int) -> list[Hit]:
    now = time.time()
    return [Hit(f"idsite=1&rec=1&url=https%3A%2F%2Fexample.com%2F{i}", now) for i in range(n)]


@asynccontextmanager
async def untrusted_tls_server() -> AsyncIterator[str]:
    """An https endpoint whose certificate no default trust store accepts."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}/matomo.php"
    finally:
        server.close()
        await server.wait_closed()


async def shut_down_during_an_outage(**options: Any) -> BatchSender:
    """Ten hits in two batches to a Matomo answering 503; closed once both failed once."""
    with Collector(sites=[1]) as collector:
        collector.set_fault(status=503)
        sender = BatchSender(
            endpoint=collector.tracking_url, batch_size=5, shutdown_timeout=0.5, **options
        )
        async with sender.running_in_background():
            for hit in hits(10):
                sender.submit(hit)
            with anyio.fail_after(DEADLINE):
                while len(collector.requests) < 2:
                    await anyio.sleep(0.01)  # polling a condition with a deadline
    return sender


def certificate_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "certificate verification failed" in r.getMessage()]


@pytest.mark.parametrize("client", ["lean", "httpx"])
async def test_a_certificate_failure_is_named_once_with_what_to_set(
    client: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    user_client = httpx.AsyncClient() if client == "httpx" else None
    async with untrusted_tls_server() as url:
        sender = BatchSender(endpoint=url, client=user_client, http_timeout=2.0)
        for _ in range(2):
            await sender.send_now(hits(2))
        transport = sender._transport.owned
        await sender.aclose()
    if user_client is not None:
        await user_client.aclose()
    else:
        assert transport is not None
        assert isinstance(transport.client, LeanClient)
    (line,) = [r for r in certificate_lines(caplog) if r.levelno == logging.ERROR]
    message = line.getMessage()
    assert "certificate verification failed for 127.0.0.1" in message
    assert "SSL_CERT_FILE" in message
    assert "client=" in message
    assert sender.stats.sent == 0
    assert sender.stats.dropped == 4
    # The retries say it too, instead of an exception's class name.
    assert "Matomo unavailable (certificate verification failed for 127.0.0.1)" in caplog.text


async def test_hits_lost_at_shutdown_name_the_shutdown_deadline_and_suggest_a_spool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    sender = await shut_down_during_an_outage(retry_deadline=60)
    assert sender.stats.dropped == 10
    drops = [r.getMessage() for r in caplog.records if "asgi_matomo: dropped" in r.getMessage()]
    assert drops
    assert all("shutdown deadline (shutdown_timeout)" in line for line in drops)
    assert all("spool_path" in line for line in drops)
    assert "retry deadline" not in caplog.text


async def test_with_a_spool_nothing_is_dropped_at_shutdown(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    sender = await shut_down_during_an_outage(spool=SqliteSpool(tmp_path / "spool.db"))
    assert (sender.stats.spooled, sender.stats.dropped) == (10, 0)
    assert "spool_path" not in caplog.text


async def test_a_spool_that_cannot_be_written_at_shutdown_is_not_told_to_set_spool_path(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # spool_path is set; its directory is a regular file: the spool cannot be used.
    (tmp_path / "not-a-dir").write_text("")
    spool = GuardedSpool(tmp_path / "not-a-dir" / "spool.db")
    caplog.set_level(logging.INFO, logger="asgi_matomo")
    sender = await shut_down_during_an_outage(spool=spool)
    assert (sender.stats.spooled, sender.stats.dropped) == (0, 10)
    drops = [r.getMessage() for r in caplog.records if "asgi_matomo: dropped" in r.getMessage()]
    assert drops
    assert all("shutdown deadline (shutdown_timeout)" in line for line in drops)
    assert not any("set spool_path" in line for line in drops)
