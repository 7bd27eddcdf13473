"""How fast the sender sends: batches in flight and their size, adapted to Matomo. No I/O.

In the spirit of Vector's adaptive request concurrency: AIMD on the observed
answer time. The sender reports every answer (its batch size, how long it took,
whether Matomo pushed back); the controller adjusts two limits, within the
bounds the options set:

- `concurrency`, the batches in flight, and `batch`, the most hits in one
  batch: while the queue has a backlog and answer times stay flat, the hits in
  flight grow (up to fourfold per round until the first sign of trouble, then
  by one batch per round), larger batches first; concurrency shrinks by a
  quarter when answer times rise by half, and halves when Matomo pushes back
  (429, 5xx, timeouts, connection errors).
- Never so large that the expected answer time reaches half of `http_timeout`
  (a batch that times out after Matomo stored it would be sent twice). The
  expectation assumes, until the answers show otherwise, that Matomo handles
  the hits in flight one after the other.

Decisions are taken once per round: when the batches sent with the current
limits (up to `concurrency` of them) have been answered, so each change is
judged on answers to the traffic it made.
"""

from __future__ import annotations

import math

__all__ = ["Controller"]

# Where both limits start (within their bounds): the fixed sizes of earlier versions.
INITIAL_CONCURRENCY = 4
INITIAL_BATCH = 100
# A round whose mean answer time exceeds the baseline by this factor means Matomo
# is getting slower under our traffic (plus an absolute margin: scheduling noise
# on answers of a few milliseconds is not a trend).
RISE = 1.5
RISE_MARGIN = 0.005
# Answer times this close to http_timeout (as a fraction of it) are too close.
TIMEOUT_SHARE = 0.5
# Multiplicative decreases: on rising answer times, and on push-back.
SLOWER = 0.75
BACK_OFF = 0.5
# Weight of a new round in the baseline answer time (an exponential average).
BASELINE_WEIGHT = 0.3
# The most the hits in flight may grow in one round.
MAX_GROWTH = 4.0


class Controller:
    """The sender's two limits, and what each answer of Matomo does to them."""

    __slots__ = (
        "_answered",
        "_backlog",
        "_baseline",
        "_epoch_sent",
        "_max_rtt",
        "_prev",
        "_slow_start",
        "_sum_rtt",
        "_too_slow",
        "batch",
        "concurrency",
        "epoch",
        "max_batch",
        "max_concurrency",
    )

    def __init__(self, *, max_concurrency: int, max_batch: int, http_timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_batch = max_batch
        self._too_slow = http_timeout * TIMEOUT_SHARE
        self.concurrency = min(INITIAL_CONCURRENCY, max_concurrency)
        self.batch = min(INITIAL_BATCH, max_batch)
        # Changes with every decision: answers to batches sent before it are not
        # judged against the new limits.
        self.epoch = 0
        self._slow_start = True
        self._baseline: float | None = None
        # (hits in flight, mean answer time) of the last round that grew: how
        # answer times respond to more traffic.
        self._prev: tuple[float, float] | None = None
        self._new_round()

    def _new_round(self) -> None:
        self.epoch += 1
        self._epoch_sent = 0
        self._answered = 0
        self._sum_rtt = 0.0
        self._max_rtt = 0.0
        self._backlog = False

    # -- what the sender reports ------------------------------------------------------

    def sent(self) -> int:
        """A batch leaves now; returns the epoch to give back with its answer."""
        self._epoch_sent += 1
        return self.epoch

    def backlog(self) -> None:
        """More hits wait than the limits let go: the limits are what holds them."""
        self._backlog = True

    def too_large(self, hits: int) -> None:
        """A batch of `hits` was refused as too large (HTTP 413): smaller ones from now on."""
        self.batch = max(1, min(self.batch, hits // 2))

    def answered(self, epoch: int, hits: int, seconds: float, *, pushed_back: bool) -> None:
        """Matomo answered a batch of `hits` sent in `epoch` after `seconds`.

        `pushed_back`: it asked for less (429, 5xx), or did not answer in time
        or at all.
        """
        if epoch != self.epoch:
            return
        if pushed_back:
            self._decrease(BACK_OFF)
            self.batch = max(min(INITIAL_BATCH, self.max_batch), self.batch // 2)
            return
        if seconds > self._too_slow:
            # Close to the timeout already: less in flight, smaller batches, now.
            self._decrease(BACK_OFF)
            self.batch = max(1, min(self.batch, math.floor(hits * self._too_slow / seconds)))
            return
        self._answered += 1
        self._sum_rtt += seconds
        self._max_rtt = max(self._max_rtt, seconds)
        if self._answered >= min(self.concurrency, self._epoch_sent):
            self._judge_round()

    # -- decisions --------------------------------------------------------------------

    def _decrease(self, factor: float) -> None:
        self.concurrency = max(1, math.floor(self.concurrency * factor))
        self._slow_start = False
        self._prev = None
        self._new_round()

    def _judge_round(self) -> None:
        mean = self._sum_rtt / self._answered
        baseline = self._baseline
        if baseline is not None and mean > baseline * RISE + RISE_MARGIN:
            self._decrease(SLOWER)
            # The slower answers are the new normal to compare with.
            self._baseline = mean
            return
        self._baseline = (
            mean if baseline is None else baseline + BASELINE_WEIGHT * (mean - baseline)
        )
        if self._backlog:
            self._grow()
        self._new_round()

    def _grow(self) -> None:
        in_flight = float(self.concurrency * self.batch)
        slowest = self._max_rtt
        # Seconds each more hit in flight adds to the slowest answer: measured from
        # the last growth when there was one, else as if Matomo took the hits in
        # flight one by one.
        per_hit = slowest / in_flight
        if self._prev is not None:
            before, before_slowest = self._prev
            if in_flight > before:
                per_hit = max(0.0, (slowest - before_slowest) / (in_flight - before))
        growth = MAX_GROWTH if self._slow_start else 1.0 + 1.0 / self.concurrency
        target = in_flight * growth
        if per_hit > 0:
            # The expected slowest answer with more in flight stays below the limit.
            target = min(target, in_flight + (self._too_slow - slowest) / per_hit)
        if target < in_flight + 1:
            return
        self._prev = (in_flight, slowest)
        # Larger batches first (fewer requests for the same hits), then more of them.
        self.batch = min(self.max_batch, max(self.batch, math.floor(target / self.concurrency)))
        self.concurrency = min(
            self.max_concurrency, max(self.concurrency, math.floor(target / self.batch))
        )
