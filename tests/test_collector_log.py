"""The collector's console: each kind of refusal said at WARNING, rate-limited."""

from __future__ import annotations

import logging

import pytest

from asgi_matomo._collector._log import WARN_INTERVAL, RefusalLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "asgi_matomo"]


def test_first_refusal_of_a_kind_is_said_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(clock=Clock())
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        assert log.refused("idsite", "idsite 7 is not served")
    assert messages(caplog) == ["collector: idsite 7 is not served"]
    assert caplog.records[0].levelno == logging.WARNING


def test_repeats_are_counted_and_said_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = RefusalLog(clock=clock)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        said = [log.refused("idsite", f"idsite {n} is not served") for n in range(50)]
        clock.now += WARN_INTERVAL - 0.1
        said.append(log.refused("idsite", "still inside the interval"))
        clock.now += 0.1
        said.append(log.refused("idsite", "idsite 9 is not served"))
        said.append(log.refused("idsite", "right after"))
    assert said == [True] + [False] * 50 + [True, False]
    assert messages(caplog) == [
        "collector: idsite 0 is not served",
        "collector: idsite 9 is not served (and 50 more like it since the last such line)",
    ]


def test_kinds_are_limited_separately(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(clock=Clock())
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        for _ in range(3):
            log.refused("idsite", "a hit without idsite")
            log.refused("cip", "cip with no token_auth")
    assert messages(caplog) == [
        "collector: a hit without idsite",
        "collector: cip with no token_auth",
    ]
