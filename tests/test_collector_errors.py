"""A bug inside the stand-in shows on its console, rate-limited, instead of a silent hang-up."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from asgi_matomo._collector import Collector


def test_an_error_inside_a_request_is_a_warning_with_its_type(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the stand-in")

    with Collector() as collector:
        monkeypatch.setattr(collector, "_handle", broken)
        with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
            for _ in range(3):
                with pytest.raises(httpx.RemoteProtocolError):
                    httpx.get(collector.tracking_url, params={"idsite": "1"}, timeout=10)
    (warning,) = caplog.records
    assert warning.getMessage().startswith(
        "collector: a request failed inside the stand-in (RuntimeError: a bug in the stand-in)"
    )
