"""What the `visitor_id` function returns: a UUID is an id, anything else unusable is said."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_matomo import MatomoMiddleware
from asgi_matomo._types import Message, Receive, Scope, Send
from asgi_matomo._visitor import VisitorIds
from asgi_matomo.testing import MatomoRecorder
from tests.helpers import http_scope

pytestmark = pytest.mark.anyio

KEY = "a test key, not a secret"
ACCOUNT = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture
async def recorder() -> AsyncIterator[MatomoRecorder]:
    double = MatomoRecorder()
    yield double
    await double.aclose()


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app: MatomoMiddleware) -> int:
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(http_scope("/"), receive, send)
    return statuses[0]


def tracked(recorder: MatomoRecorder, result: object) -> MatomoMiddleware:
    # Typed Any: the point is what an app's function returns whatever its hints say.
    function: Any = lambda scope: result  # noqa: E731
    return MatomoMiddleware(
        ok_app,
        matomo_url="https://matomo.example.org",
        idsite=1,
        client=recorder.client,
        visitor_key=KEY,
        visitor_id=function,
    )


async def test_a_uuid_names_the_visitor_like_its_text(recorder: MatomoRecorder) -> None:
    # Primary keys are often UUIDs (Django's UUIDField, SQLAlchemy's Uuid).
    assert await call(tracked(recorder, ACCOUNT)) == 200
    (hit,) = recorder.hits
    assert hit["cid"] == VisitorIds(KEY.encode(), 1).app_id(str(ACCOUNT))


@pytest.mark.parametrize("junk", [3.5, ["user-1"], True, object()], ids=type)
async def test_a_result_that_is_no_id_is_said_once_and_the_hit_kept(
    junk: object, recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    app = tracked(recorder, junk)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        assert await call(app) == 200
        assert await call(app) == 200
    default = VisitorIds(KEY.encode(), 1).daily_id
    assert [hit["cid"] for hit in recorder.hits] == [
        default("203.0.113.7", None, float(hit["cdt"])) for hit in recorder.hits
    ]
    (warning,) = caplog.records
    message = warning.getMessage()
    assert f"the visitor_id function returned {type(junk).__name__} instead of" in message


async def test_none_and_empty_text_are_no_id_without_a_warning(
    recorder: MatomoRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        assert await call(tracked(recorder, None)) == 200
        assert await call(tracked(recorder, "")) == 200
    assert len(recorder.hits) == 2
    assert caplog.records == []
