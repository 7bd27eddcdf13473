"""Your app's tests, with asgi_matomo.testing.MatomoRecorder as the Matomo."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.testclient import TestClient

from asgi_matomo.testing import MatomoRecorder

from .app import create_app


def test_homepage_is_tracked() -> None:
    recorder = MatomoRecorder()
    client = TestClient(create_app(matomo_client=recorder.client))

    response = client.get("/?utm_source=newsletter", headers={"User-Agent": "pytest"})

    assert response.status_code == 200
    # Without `with`, no lifespan runs: the hit is sent before get() returns.
    (hit,) = recorder.hits
    assert hit["url"] == "https://testserver/?utm_source=newsletter"
    assert hit["action_name"] == "/"
    assert hit["ua"] == "pytest"


def test_health_checks_are_not_tracked() -> None:
    recorder = MatomoRecorder()
    # With `with`, the lifespan runs the background sender; leaving the block
    # flushes it, so every hit has arrived afterwards.
    with TestClient(create_app(matomo_client=recorder.client)) as client:
        client.get("/health")
        client.get("/")
    assert [hit["action_name"] for hit in recorder.hits] == ["/"]


@pytest.mark.anyio
async def test_homepage_is_tracked_async() -> None:
    recorder = MatomoRecorder()
    async with (
        LifespanManager(create_app(matomo_client=recorder.client)) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        await client.get("/")
        # The background sender sends within flush_interval (1 s by default).
        hits = await recorder.wait_for(1)
    assert hits[0]["url"] == "https://testserver/"
