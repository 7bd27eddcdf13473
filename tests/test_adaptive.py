"""The adaptive controller, driven by synthetic answer sequences (no I/O)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from asgi_matomo._adaptive import INITIAL_BATCH, INITIAL_CONCURRENCY, TIMEOUT_SHARE, Controller

TIMEOUT = 5.0


def controller(max_concurrency: int = 16, max_batch: int = 1000) -> Controller:
    return Controller(max_concurrency=max_concurrency, max_batch=max_batch, http_timeout=TIMEOUT)


def round_trip(
    c: Controller, latency: Callable[[int, int], float], *, backlog: bool = True
) -> list[float]:
    """One round at the current limits: `latency(k, hits)` answers the k-th batch in flight."""
    if backlog:
        c.backlog()
    sent = [(c.sent(), c.batch) for _ in range(c.concurrency)]
    times = [latency(k, hits) for k, (_, hits) in enumerate(sent, start=1)]
    for (epoch, hits), seconds in zip(sent, times, strict=True):
        c.answered(epoch, hits, seconds, pushed_back=False)
    return times


def test_starts_where_the_fixed_sizes_were_within_the_limits() -> None:
    assert (controller().concurrency, controller().batch) == (INITIAL_CONCURRENCY, INITIAL_BATCH)
    assert (controller(2, 10).concurrency, controller(2, 10).batch) == (2, 10)


def test_converges_up_to_the_limits_on_a_flat_answer_time() -> None:
    # A Matomo that answers in 2 s whatever it is sent (the hits go to a queue).
    c = controller()
    history = []
    for _ in range(8):
        round_trip(c, lambda k, hits: 2.0)
        history.append((c.concurrency, c.batch))
    assert (c.concurrency, c.batch) == (16, 1000)
    # Hits in flight never shrink, and grow to the limits in a few rounds.
    in_flight = [a * b for a, b in history]
    assert in_flight == sorted(in_flight)
    assert history.index((16, 1000)) <= 5


def test_flat_but_without_a_backlog_nothing_grows() -> None:
    c = controller()
    for _ in range(5):
        round_trip(c, lambda k, hits: 0.01, backlog=False)
    assert (c.concurrency, c.batch) == (INITIAL_CONCURRENCY, INITIAL_BATCH)


def test_a_matomo_that_serves_one_batch_at_a_time_never_times_out() -> None:
    # 3 ms per hit, one batch after the other: the k-th batch in flight waits
    # for the k - 1 before it. Answer time grows with everything in flight.
    per_hit = 0.003

    def serial(k: int, hits: int) -> float:
        return k * hits * per_hit

    c = controller()
    slowest = 0.0
    rates, limits = [], []
    for _ in range(30):
        times = round_trip(c, serial)
        slowest = max(slowest, *times)
        rates.append(c.concurrency * c.batch / max(times))
        limits.append((c.concurrency, c.batch))
    # Never an answer close to the timeout: at most half of it (and a rounding).
    assert slowest <= TIMEOUT * TIMEOUT_SHARE + 0.01
    # Converged: the same limits round after round, taking what Matomo can take.
    assert len(set(limits[-10:])) == 1
    assert min(rates[-10:]) >= 0.8 / per_hit


def test_rising_answer_times_bring_concurrency_down() -> None:
    c = controller()
    for _ in range(6):
        round_trip(c, lambda k, hits: 0.05)
    assert c.concurrency == 16
    # Matomo has 4 workers: a batch beyond them waits for one to be free.
    history = []
    for _ in range(10):
        round_trip(c, lambda k, hits: 0.05 * ((k - 1) // 4 + 1))
        history.append(c.concurrency)
    assert history[0] < 16
    assert min(history) <= 12


@pytest.mark.parametrize("start", [1, 4, 16])
def test_push_back_halves_concurrency_down_to_one(start: int) -> None:
    c = controller()
    c.concurrency = start
    seen = []
    for _ in range(6):
        epoch = c.sent()
        c.answered(epoch, c.batch, 0.01, pushed_back=True)  # a 503
        seen.append(c.concurrency)
    assert seen[-1] == 1
    assert all(b <= max(1, a // 2 + 1) for a, b in zip([start, *seen], seen, strict=False))


def test_one_decision_per_round_not_per_answer() -> None:
    c = controller()
    c.concurrency = 16
    epochs = [c.sent() for _ in range(16)]
    for epoch in epochs:  # 16 answers of one round, all 503
        c.answered(epoch, 100, 0.01, pushed_back=True)
    assert c.concurrency == 8


def test_an_answer_close_to_the_timeout_shrinks_the_batch() -> None:
    c = controller()
    epoch = c.sent()
    c.answered(epoch, 100, TIMEOUT * 0.8, pushed_back=False)
    assert c.batch < 100 * TIMEOUT_SHARE / 0.8 + 1
    assert c.concurrency == INITIAL_CONCURRENCY // 2


def test_a_batch_too_large_for_the_server_halves_the_batch() -> None:
    c = controller()
    c.too_large(100)
    assert c.batch == 50
    c.too_large(1)
    assert c.batch == 1


def test_answers_to_earlier_limits_are_not_judged() -> None:
    c = controller()
    old = c.sent()
    c.answered(c.sent(), 100, 0.01, pushed_back=True)  # a new round begins
    before = (c.concurrency, c.batch)
    c.answered(old, 100, 0.01, pushed_back=True)
    assert (c.concurrency, c.batch) == before


@pytest.mark.parametrize("seed", range(20))
def test_never_beyond_the_limits_whatever_the_answers(seed: int) -> None:
    rng = random.Random(seed)
    max_concurrency, max_batch = rng.randint(1, 20), rng.randint(1, 2000)
    c = controller(max_concurrency, max_batch)
    in_flight: list[tuple[int, int]] = []
    for _ in range(500):
        action = rng.random()
        if action < 0.1:
            c.backlog()
        elif action < 0.5 or not in_flight:
            in_flight.append((c.sent(), c.batch))
        else:
            epoch, hits = in_flight.pop(rng.randrange(len(in_flight)))
            seconds = rng.choice([0.001, 0.1, 1.0, 3.0, 10.0]) * rng.random()
            c.answered(epoch, hits, seconds, pushed_back=rng.random() < 0.1)
        assert 1 <= c.concurrency <= max_concurrency
        assert 1 <= c.batch <= max_batch
