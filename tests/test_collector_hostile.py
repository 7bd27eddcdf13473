"""The stand-in answers like Matomo whatever a sender throws at it, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from asgi_matomo._collector import Collector

# Deeper than Python's recursion limit: json.loads raises RecursionError, not
# ValueError. PHP's json_decode gives up at depth 512 and Matomo goes on.
DEPTH = 100_000


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


def test_a_bulk_body_nested_too_deep_is_malformed_json_answered_with_zero_counts(
    collector: Collector,
) -> None:
    body = b'{"requests": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    response = httpx.post(
        collector.tracking_url,
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json() == {"status": "success", "tracked": 0, "invalid": 0}


def test_a_custom_variable_nested_too_deep_is_dropped_and_the_hit_kept(
    collector: Collector,
) -> None:
    hit = "?idsite=1&rec=1&url=http%3A%2F%2Fapp.test%2F&cvar=" + "%5B" * DEPTH
    response = httpx.post(
        collector.tracking_url, content=json.dumps({"requests": [hit]}), timeout=30
    )
    assert response.status_code == 200
    assert response.json() == {"status": "success", "tracked": 1, "invalid": 0}
    (stored,) = collector.wait_for_hits(1)
    assert stored.url == "http://app.test/"
    assert stored.cvar is None
