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


def test_each_reason_of_a_kind_is_said(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(clock=Clock())
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        for _ in range(3):
            log.refused("idsite", "idsite 3 is not served", "not served 3")
            log.refused("idsite", "idsite 7 is not served", "not served 7")
            log.refused("cip", "cip with no token_auth", "no token_auth")
            log.refused("cip", "cip with a wrong token_auth", "a wrong token_auth")
    assert messages(caplog) == [
        "collector: idsite 3 is not served",
        "collector: idsite 7 is not served",
        "collector: cip with no token_auth",
        "collector: cip with a wrong token_auth",
    ]


def test_reasons_followed_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RefusalLog(clock=clock, max_reasons=3)
    with caplog.at_level(logging.WARNING, logger="asgi_matomo"):
        said = [log.refused("idsite", f"idsite {n}", f"site {n}") for n in range(10)]
        assert len(log) == 4  # three reasons and the kind's overflow line
        clock.now += WARN_INTERVAL
        # Every line is old now: the next new reason sweeps the table.
        said.append(log.refused("idsite", "idsite 0", "site 0"))
        said.append(log.refused("idsite", "idsite 10", "site 10"))
        said.append(log.refused("idsite", "idsite 11", "site 11"))
    assert said == [True] * 4 + [False] * 6 + [True] * 3
    # Sites 1 and 2 were forgotten; the overflow line, with its count, was not.
    assert len(log) == 3
    assert messages(caplog) == [
        "collector: idsite 0",
        "collector: idsite 1",
        "collector: idsite 2",
        "collector: idsite 3",
        "collector: idsite 0",
        "collector: idsite 10",
        "collector: idsite 11 (and 6 more like it since the last such line)",
    ]


def test_a_full_table_is_swept_at_most_once_a_second() -> None:
    clock = Clock()
    log = RefusalLog(clock=clock, max_reasons=2)
    log.refused("idsite", "a", "a")
    log.refused("idsite", "b", "b")
    log.refused("idsite", "c", "c")  # swept: nothing old, so the overflow line
    clock.now += WARN_INTERVAL
    assert log.refused("idsite", "d", "d")  # swept again: a and b go
    assert log.refused("idsite", "e", "e")
    assert log.refused("idsite", "f", "f")  # full, but swept less than a second ago
    assert log.refused("idsite", "g", "g") is False
    assert len(log) == 3
