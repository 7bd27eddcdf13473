"""set_tracking_params given something that is not a dict: said once, the request goes on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_matomo import MatomoMiddleware, _state, set_tracking_params
from asgi_matomo._types import Receive, Scope, Send
from asgi_matomo.testing import MatomoRecorder
from tests.helpers import call_app, http_scope

pytestmark = pytest.mark.anyio


@pytest.fixture
async def recorder() -> AsyncIterator[MatomoRecorder]:
    double = MatomoRecorder()
    yield double
    await double.aclose()


async def misusing_app(scope: Scope, receive: Receive, send: Send) -> None:
    # What a caller may pass despite the type hints: a list of pairs, a query string.
    params: Any = [("uid", "user-1")] if scope["path"] == "/list" else "uid=user-1"
    found = set_tracking_params(params, dimension1="kept")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%r" % found})


async def test_a_positional_argument_that_is_no_mapping_is_said_once(
    recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_state, "_misuse_said", False)
    app = MatomoMiddleware(
        misusing_app,
        matomo_url="https://matomo.example.org",
        idsite=1,
        client=recorder.client,
        visitor_key="a test key, not a secret",
    )
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        for path in ("/list", "/text"):
            start, body = await call_app(app, http_scope(path))
            assert start["status"] == 200
            assert body["body"] == b"True"  # the keyword arguments were set
    assert [hit["dimension1"] for hit in recorder.hits] == ["kept", "kept"]
    assert all("uid" not in hit for hit in recorder.hits)
    (warning,) = caplog.records
    assert "set_tracking_params was given list instead of a dict" in warning.getMessage()
