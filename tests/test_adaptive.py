"""The adaptive controller, driven by synthetic answer sequences (no I/O, simulated time)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest

from asgi_matomo._adaptive import (
    CUT_SHARE,
    INITIAL_BATCH,
    INITIAL_CONCURRENCY,
    MAX_PACE,
    TIMEOUT_SHARE,
    Controller,
)

TIMEOUT = 5.0
# A Matomo model: (now, hits of this batch) -> seconds until its answer.
Model = Callable[[float, int], float]


def controller(max_concurrency: int = 16, max_batch: int = 1000) -> Controller:
    return Controller(max_concurrency=max_concurrency, max_batch=max_batch, http_timeout=TIMEOUT)


class Run:
    """The sender's side, simulated: every free slot takes a full batch (a backlog)."""

    def __init__(self, c: Controller, model: Model, *, backlog: bool = True) -> None:
        self.c = c
        self.model = model
        self.backlog = backlog
        self.now = 0.0
        self.flight: list[tuple[float, float, int]] = []  # (answer at, sent at, hits)
        self.answers: list[tuple[float, float, int]] = []  # (at, seconds, hits)
        self.limits: list[tuple[float, int, int]] = []  # (at, concurrency, batch)

    def until(self, end: float) -> Run:
        while self.now < end:
            while len(self.flight) < self.c.concurrency:
                if self.backlog:
                    self.c.backlog()
                hits = self.c.batch
                self.c.sent(hits)
                answer_at = self.now + self.model(self.now, hits)
                heapq.heappush(self.flight, (answer_at, self.now, hits))
            answer_at, sent_at, hits = heapq.heappop(self.flight)
            self.now = answer_at
            self.c.answered(hits, answer_at - sent_at, answer_at, pushed_back=False)
            self.answers.append((answer_at, answer_at - sent_at, hits))
            self.limits.append((answer_at, self.c.concurrency, self.c.batch))
        return self

    def rate(self, since: float) -> float:
        """Hits answered per second since `since`."""
        hits = sum(h for at, _, h in self.answers if at >= since)
        return hits / (self.now - since)


def flat(seconds: float) -> Model:
    return lambda now, hits: seconds


def one_at_a_time(per_hit: float) -> Model:
    """A Matomo that serves one batch at a time: a batch waits for those before it."""
    free_at = [0.0]

    def model(now: float, hits: int) -> float:
        free_at[0] = max(free_at[0], now) + hits * per_hit
        return free_at[0] - now

    return model


def test_starts_where_the_fixed_sizes_were_within_the_limits() -> None:
    assert (controller().concurrency, controller().batch) == (INITIAL_CONCURRENCY, INITIAL_BATCH)
    assert (controller(2, 10).concurrency, controller(2, 10).batch) == (2, 10)


def test_converges_up_to_the_limits_on_a_flat_answer_time() -> None:
    # A Matomo that answers in 2 s whatever it is sent (the hits go to a queue).
    run = Run(controller(), flat(2.0)).until(30.0)
    assert (run.c.concurrency, run.c.batch) == (16, 1000)
    # Quickly: all of it in flight within a few answer times, never less after.
    reached = next(at for at, c, b in run.limits if (c, b) == (16, 1000))
    assert reached <= 8.0
    in_flight = [c * b for _, c, b in run.limits]
    assert in_flight == sorted(in_flight)
    assert run.rate(since=10.0) == pytest.approx(16 * 1000 / 2.0, rel=0.01)


def test_flat_but_without_a_backlog_nothing_grows() -> None:
    run = Run(controller(), flat(0.01), backlog=False).until(10.0)
    assert (run.c.concurrency, run.c.batch) == (INITIAL_CONCURRENCY, INITIAL_BATCH)


@pytest.mark.parametrize("seed", range(8))
def test_a_flat_matomo_seen_from_a_saturated_app_gets_everything_in_flight(seed: int) -> None:
    # Matomo answers in 2 s whatever it is sent, but the app's event loop, busy
    # serving, reads the answers up to 0.9 s late, and not all equally late: the
    # spread is the app's, not a cost of the hits in flight.
    lag = random.Random(seed)
    run = Run(controller(), lambda now, hits: 2.0 + lag.choice([0.05, 0.1, 0.15, 0.4, 0.6, 0.9]))
    run.until(40.0)
    assert (run.c.concurrency, run.c.batch) == (16, 1000)
    assert max(seconds for _, seconds, _ in run.answers) < TIMEOUT * TIMEOUT_SHARE


@pytest.mark.parametrize("per_hit", [0.0005, 0.003, 0.01])
def test_a_matomo_that_serves_one_batch_at_a_time_gets_no_timeout(per_hit: float) -> None:
    # Answer times grow with everything in flight: the k-th batch waits for the
    # k - 1 before it.
    run = Run(controller(), one_at_a_time(per_hit)).until(120.0)
    slowest = max(seconds for _, seconds, _ in run.answers)
    # Never a timeout: the growth stops at 60 % of it, overshoots by one step at
    # most, and the first batches of a Matomo this slow are what they are.
    assert slowest <= TIMEOUT * CUT_SHARE
    # Converged: what Matomo can take, nearly all the time.
    assert run.rate(since=60.0) >= 0.9 / per_hit
    assert len({(c, b) for at, c, b in run.limits if at >= 60.0}) <= 3


def test_rising_answer_times_bring_concurrency_down() -> None:
    # Fast and flat at first; then Matomo has 2 workers: answers slow down with
    # every batch in flight beyond them.
    state = {"contended": False}
    run = Run(controller(), lambda now, hits: 0.05)

    def contended(now: float, hits: int) -> float:
        return 0.05 * max(1.0, (len(run.flight) + 1) / 2)

    run.until(5.0)
    assert run.c.concurrency == 16
    state["contended"] = True
    run.model = contended
    run.until(10.0)
    assert min(c for at, c, _ in run.limits if at > 5.0) < 16


@pytest.mark.parametrize("start", [1, 4, 16])
def test_push_back_halves_concurrency_down_to_one(start: int) -> None:
    c = controller()
    c.concurrency = start
    seen = []
    for n in range(6):
        c.sent(c.batch)
        c.answered(c.batch, 0.01, float(n), pushed_back=True)  # a 503
        seen.append(c.concurrency)
    assert seen[-1] == 1
    assert all(b == max(1, a // 2) for a, b in zip([start, *seen], seen, strict=False))
    assert c.batch == INITIAL_BATCH


def test_an_answer_close_to_the_timeout_cuts_at_once() -> None:
    c = controller()
    c.sent(100)
    c.answered(100, TIMEOUT * 0.9, 10.0, pushed_back=False)
    assert TIMEOUT * 0.9 > TIMEOUT * CUT_SHARE
    assert c.batch == int(100 * TIMEOUT_SHARE / 0.9)
    assert c.concurrency == INITIAL_CONCURRENCY // 2


@pytest.mark.parametrize("kind", ["close to the timeout", "push-back"])
def test_one_cut_per_round_not_one_per_answer_of_a_burst(kind: str) -> None:
    # 16 batches sent together and answered together, all slow (or all 503): the
    # first answer cuts; the others were sent before that cut and do not cut again.
    c = controller()
    c.concurrency = 16
    for _ in range(16):
        c.sent(1000)
    seconds, pushed_back = (TIMEOUT * 0.82, False) if kind != "push-back" else (0.5, True)
    for i in range(16):
        c.answered(1000, seconds, 10.0 + i * 0.01, pushed_back=pushed_back)
    assert c.concurrency == 8
    # A batch sent after the cut that is slow again cuts again.
    c.sent(c.batch)
    c.answered(c.batch, seconds, 10.2 + seconds, pushed_back=pushed_back)
    assert c.concurrency == 4


def test_batches_from_a_backlog_are_spread_over_an_answer_time() -> None:
    c = controller()
    assert c.pace() == 0.0  # no answer time known yet: nothing to spread over
    for i in range(INITIAL_CONCURRENCY):
        c.sent(100)
        c.answered(100, 2.0, 2.0 + i * 0.01, pushed_back=False)
    assert c.pace() > 0.0
    c.concurrency = 16
    assert c.pace() == pytest.approx(2.0 / 16)
    c.concurrency = 2
    assert c.pace() == MAX_PACE  # at most MAX_PACE, however slow the answers
    c.concurrency = 1
    assert c.pace() == 0.0  # one batch at a time: the answer itself paces it


def test_slow_but_steady_answers_neither_grow_nor_cut() -> None:
    # Between 60 % of the timeout and the cut: what is in flight stays as it is.
    run = Run(controller(), flat(TIMEOUT * 0.7)).until(60.0)
    assert (run.c.concurrency, run.c.batch) == (INITIAL_CONCURRENCY, INITIAL_BATCH)


def test_a_batch_too_large_for_the_server_halves_the_batch() -> None:
    c = controller()
    c.too_large(100)
    assert c.batch == 50
    c.too_large(1)
    assert c.batch == 1


def test_cancelled_batches_are_no_longer_in_flight() -> None:
    c = controller()
    c.sent(100)
    c.cancelled(100)
    c.cancelled(100)  # never below zero
    c.backlog()
    c.sent(100)
    # The window's peak is what was really in flight: one batch, not three.
    c.answered(100, 0.01, 0.0, pushed_back=False)
    c.answered(0, 0.01, 1.0, pushed_back=False)
    assert c.concurrency * c.batch <= 4 * 100


@pytest.mark.parametrize("seed", range(20))
def test_never_beyond_the_limits_whatever_the_answers(seed: int) -> None:
    rng = random.Random(seed)
    max_concurrency, max_batch = rng.randint(1, 20), rng.randint(1, 2000)
    c = controller(max_concurrency, max_batch)
    in_flight: list[int] = []
    now = 0.0
    for _ in range(1000):
        action = rng.random()
        now += rng.random() * 0.5
        if action < 0.2:
            c.backlog()
        elif action < 0.5 or not in_flight:
            in_flight.append(c.batch)
            c.sent(c.batch)
        elif action < 0.55:
            c.cancelled(in_flight.pop(rng.randrange(len(in_flight))))
        else:
            hits = in_flight.pop(rng.randrange(len(in_flight)))
            seconds = rng.choice([0.001, 0.1, 1.0, 3.0, 10.0]) * rng.random()
            c.answered(hits, seconds, now, pushed_back=rng.random() < 0.05)
        assert 1 <= c.concurrency <= max_concurrency
        assert 1 <= c.batch <= max_batch


@pytest.mark.parametrize("cut_by", ["slow answer", "413"])
def test_push_back_never_makes_a_cut_batch_larger_again(cut_by: str) -> None:
    c = controller()
    c.sent(100)
    if cut_by == "413":
        c.too_large(100)
    else:
        c.answered(100, TIMEOUT * 0.9, 1.0, pushed_back=False)
    cut = c.batch
    assert cut < INITIAL_BATCH
    for n in range(3):
        c.sent(c.batch)
        c.answered(c.batch, 0.01, 2.0 + n, pushed_back=True)  # a 503, or a refused connection
        assert c.batch == cut


def test_a_timeout_shrinks_the_batch_like_an_answer_close_to_the_timeout() -> None:
    # A Matomo too slow to answer 100 hits in time: each timeout (a push-back after
    # http_timeout) must leave batches that can be answered in time, not 100 again.
    c = controller()
    sizes = []
    for n in range(4):
        hits = c.batch
        c.sent(hits)
        c.answered(hits, TIMEOUT, 10.0 * n, pushed_back=True)
        sizes.append(c.batch)
    assert sizes == [60, 36, 21, 12]
    assert c.concurrency == 1


def test_a_batch_cut_by_an_outage_comes_back_without_a_backlog() -> None:
    # Timeouts of a Matomo that does not answer at all cut the batch; once it answers
    # fast again, the batch returns to the initial size even without a backlog
    # (light traffic, a spool replayed), instead of a few hits per request for good.
    c = controller()
    for n in range(6):
        c.sent(c.batch)
        c.answered(c.batch, TIMEOUT, 10.0 * n, pushed_back=True)
    assert c.batch < 10
    run = Run(c, flat(0.01), backlog=False).until(200.0)
    assert run.c.batch == INITIAL_BATCH
    assert run.c.concurrency == 1  # without a backlog, nothing else grows


def test_a_batch_refused_as_too_large_never_grows_back_to_that_size() -> None:
    c = controller()
    c.too_large(100)
    run = Run(c, flat(0.01)).until(60.0)
    assert max(batch for _, _, batch in run.limits) < 100
