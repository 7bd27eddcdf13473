"""PerfMsTracker on its own: no middleware needed."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_matomo.trackers import PerfMsTracker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sync_use_creates_state_and_writes_whole_milliseconds() -> None:
    scope: dict[str, Any] = {"type": "http"}
    with PerfMsTracker(scope=scope, key="pf_srv") as tracker:
        assert isinstance(tracker, PerfMsTracker)
    value = scope["state"]["asgi_matomo"]["pf_srv"]
    assert isinstance(value, int)
    assert value >= 0


async def test_async_use_keeps_other_overrides() -> None:
    scope: dict[str, Any] = {"state": {"asgi_matomo": {"uid": "u"}, "other": 1}}
    async with PerfMsTracker(scope=scope, key="pf_net"):
        pass
    assert scope["state"]["other"] == 1
    assert scope["state"]["asgi_matomo"]["uid"] == "u"
    assert isinstance(scope["state"]["asgi_matomo"]["pf_net"], int)


def test_time_is_recorded_even_when_the_block_raises() -> None:
    scope: dict[str, Any] = {}
    with pytest.raises(KeyError), PerfMsTracker(scope=scope, key="pf_srv"):
        raise KeyError("x")
    assert "pf_srv" in scope["state"]["asgi_matomo"]


@pytest.mark.parametrize("state", [None, "text", {"asgi_matomo": "text"}])
def test_odd_state_is_replaced_by_a_usable_one(state: object) -> None:
    scope: dict[str, Any] = {"state": state}
    with PerfMsTracker(scope=scope, key="pf_srv"):
        pass
    assert isinstance(scope["state"]["asgi_matomo"]["pf_srv"], int)


@pytest.mark.parametrize("key", ["", None, 5])
def test_key_must_be_a_name(key: Any) -> None:
    with pytest.raises(ValueError, match="key"):
        PerfMsTracker(scope={}, key=key)
