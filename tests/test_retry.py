"""The retry policy: the own backoff's floor and jitter, and what Retry-After may change."""

from __future__ import annotations

import math

import pytest

from asgi_matomo._retry import (
    RETRY_AFTER_CAP,
    RETRY_AFTER_JITTER,
    RETRY_BASE,
    RETRY_CAP,
    backoff_delay,
    replay_delay,
    retries_within,
    retry_delay,
)


def ceiling(attempt: int) -> float:
    return min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt - 1, 64))


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 7, 8, 100, 10_000])
def test_backoff_has_a_floor_and_jitter_up_to_the_cap(attempt: int) -> None:
    assert backoff_delay(attempt, lambda: 0.0) == ceiling(attempt) / 2
    assert backoff_delay(attempt, lambda: 0.999999) == pytest.approx(ceiling(attempt), rel=1e-5)
    for _ in range(50):
        assert ceiling(attempt) / 2 <= backoff_delay(attempt) <= ceiling(attempt) <= RETRY_CAP


@pytest.mark.parametrize("retry_after", [None, 0.0, -5.0, math.nan, 0.1])
@pytest.mark.parametrize("attempt", [1, 2, 5, 50])
@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_retry_after_never_shortens_the_own_backoff(
    retry_after: float | None, attempt: int, r: float
) -> None:
    assert retry_delay(attempt, retry_after, lambda: r) == backoff_delay(attempt, lambda: r)


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_retry_after_lengthens_the_wait_with_jitter(r: float) -> None:
    delay = retry_delay(1, 7.0, lambda: r)
    assert delay == 7.0 * (1 + RETRY_AFTER_JITTER * r)
    assert 7.0 <= delay <= 7.0 * (1 + RETRY_AFTER_JITTER)


@pytest.mark.parametrize("retry_after", [RETRY_AFTER_CAP + 1, 86_400.0 * 365, math.inf])
def test_a_huge_retry_after_is_capped(retry_after: float) -> None:
    assert retry_delay(1, retry_after, lambda: 0.0) == RETRY_AFTER_CAP
    assert retry_delay(1, retry_after, lambda: 1.0) == RETRY_AFTER_CAP * (1 + RETRY_AFTER_JITTER)


def test_retries_within_a_window_are_bounded_by_the_floors() -> None:
    # Floors: 0.25, 0.5, 1, 2, 4, ... seconds; their running sums bound the retries.
    assert [retries_within(w) for w in (0.1, 0.25, 0.74, 0.75, 2.0, 10.0)] == [0, 1, 1, 2, 3, 5]
    # The cap of the own backoff: one retry per RETRY_CAP / 2 at most, in the long run.
    long = retries_within(3600.0)
    assert long <= 3600.0 / (RETRY_CAP / 2) + 8


def test_replay_delay_is_half_fixed_half_jitter() -> None:
    assert replay_delay(1, rand=lambda: 0.0) == RETRY_BASE
    assert replay_delay(1, rand=lambda: 1.0) == 2 * RETRY_BASE
    assert replay_delay(3, rand=lambda: 1.0) == 8 * RETRY_BASE
    assert replay_delay(99, rand=lambda: 1.0) == RETRY_CAP
    assert replay_delay(99, rand=lambda: 0.0) == RETRY_CAP / 2


@pytest.mark.parametrize("retry_after", [None, 0.0, -5.0, math.nan, 0.1])
@pytest.mark.parametrize("failures", [1, 3, 99])
@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_a_short_retry_after_leaves_the_replay_to_its_own_backoff(
    retry_after: float | None, failures: int, r: float
) -> None:
    own = replay_delay(failures, rand=lambda: r)
    assert replay_delay(failures, retry_after, lambda: r) == own


@pytest.mark.parametrize(
    ("retry_after", "base"),
    [(45.0, 45.0), (RETRY_AFTER_CAP + 1, RETRY_AFTER_CAP), (math.inf, RETRY_AFTER_CAP)],
)
def test_the_replay_waits_a_long_retry_after_capped_with_jitter(
    retry_after: float, base: float
) -> None:
    assert replay_delay(1, retry_after, lambda: 0.0) == base
    assert replay_delay(1, retry_after, lambda: 1.0) == base * (1 + RETRY_AFTER_JITTER)
