"""The same test with a plain mock of httpx.AsyncClient."""

from __future__ import annotations

import json
from unittest import mock
from urllib.parse import parse_qsl

import httpx
from starlette.testclient import TestClient

from .app import create_app


def test_homepage_is_tracked_with_a_mock() -> None:
    matomo = mock.AsyncMock(httpx.AsyncClient)
    matomo.post.return_value = httpx.Response(
        200, json={"status": "success", "tracked": 1, "invalid": 0}
    )
    client = TestClient(create_app(matomo_client=matomo))

    client.get("/")

    # One bulk request: a JSON body with one query string per hit.
    matomo.post.assert_awaited_once()
    (url,), kwargs = matomo.post.call_args
    assert url == "https://matomo.example.org/matomo.php"
    (query,) = json.loads(kwargs["content"])["requests"]
    hit = dict(parse_qsl(query.lstrip("?")))
    assert (hit["idsite"], hit["rec"], hit["action_name"]) == ("1", "1", "/")
