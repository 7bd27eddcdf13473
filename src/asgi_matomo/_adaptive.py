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
- Never so large that the expected answer time reaches 60 % of `http_timeout`
  (a batch that times out after Matomo stored it would be sent twice). The
  expectation assumes, until the answers show otherwise, that Matomo handles
  the hits in flight one after the other. An answer slower than 80 % of
  `http_timeout` halves the batches in flight and shrinks the batch size at once;
  so does a timeout. A batch cut below its initial size grows back to it while
  answers are fast, backlog or not; a size refused with 413 is not reached again.

Decisions are taken once per window of about one answer time (Vector's
"RTT window"): the answers that arrived in it are judged together, against
the hits that were really in flight meanwhile. A push-back or an answer close
to the timeout is acted on at once, and starts a new window. One cut per
round: the other answers to batches sent before a cut do not cut again.

Batches sent from a backlog are spread over an answer time (`pace`): sent
together, they reach Matomo together and wait there for each other, and the
answer times rise for no other reason than the burst.

Answer times measured by a busy app spread for reasons of its own (its event
loop answers late when the CPU is saturated). Before reading a spread as the
cost of more hits in flight, the controller checks that Matomo could take hits
one by one at that cost at all: a batch answered right after another one took
at most the time between the two answers. (How the slowest answer changes as
the hits in flight grow is taken as it is.)
"""

from __future__ import annotations

import math

__all__ = ["Controller"]

# Where both limits start (within their bounds): the fixed sizes of earlier versions.
INITIAL_CONCURRENCY = 4
INITIAL_BATCH = 100
# A window whose mean answer time exceeds the baseline by this factor means Matomo
# is getting slower under our traffic (plus an absolute margin: scheduling noise
# on answers of a few milliseconds is not a trend).
RISE = 1.5
RISE_MARGIN = 0.005
# Above the answer time the growth aims at (below), a smaller rise is enough.
STEP_RISE = 1.1
# The hits in flight grow only while the expected slowest answer stays below this
# share of http_timeout...
TIMEOUT_SHARE = 0.6
# ... and an answer slower than this share of it cuts them at once.
CUT_SHARE = 0.8
# Multiplicative decreases: on rising answer times, and on push-back.
SLOWER = 0.75
BACK_OFF = 0.5
# Weight of a new window in the baseline answer time (an exponential average).
BASELINE_WEIGHT = 0.3
# The most the hits in flight may grow in one window.
MAX_GROWTH = 4.0
# The longest pause between two batches sent from a backlog, in seconds.
MAX_PACE = 0.25
# The shortest window, in seconds: against a fast Matomo, decisions every few
# milliseconds would follow noise.
MIN_WINDOW = 0.1


class Controller:
    """The sender's two limits, and what each answer of Matomo does to them.

    `now` arguments are readings of a monotonic clock, in seconds.
    """

    __slots__ = (
        "_answered",
        "_answered_hits",
        "_backlog",
        "_baseline",
        "_cut",
        "_in_flight",
        "_last_at",
        "_last_cut",
        "_max_rtt",
        "_min_hits",
        "_min_rtt",
        "_peak",
        "_prev",
        "_serial",
        "_slow_start",
        "_sum_rtt",
        "_too_slow",
        "_window_end",
        "batch",
        "concurrency",
        "max_batch",
        "max_concurrency",
    )

    def __init__(self, *, max_concurrency: int, max_batch: int, http_timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_batch = max_batch
        self._too_slow = http_timeout * TIMEOUT_SHARE
        self._cut = http_timeout * CUT_SHARE
        self.concurrency = min(INITIAL_CONCURRENCY, max_concurrency)
        self.batch = min(INITIAL_BATCH, max_batch)
        self._slow_start = True
        self._last_cut = -math.inf  # when the limits were last cut
        self._baseline: float | None = None
        self._in_flight = 0  # hits sent and not answered yet
        # (peak hits in flight, slowest answer) of the last window that grew: how
        # answer times respond to more traffic.
        self._prev: tuple[int, float] | None = None
        self._window_end: float | None = None  # None: begins with the next answer
        self._last_at: float | None = None  # when the last answer arrived
        self._new_window()

    def _new_window(self, end: float | None = None) -> None:
        self._window_end = end
        self._answered = 0
        self._sum_rtt = 0.0
        self._max_rtt = 0.0
        self._min_rtt = math.inf
        self._min_hits = 0  # of the fastest answer
        self._answered_hits = 0
        # The most seconds per hit a Matomo taking hits one by one can have spent,
        # from the answers of this window (see _grow).
        self._serial = math.inf
        self._peak = self._in_flight
        self._backlog = False

    # -- what the sender reports ------------------------------------------------------

    def sent(self, hits: int) -> None:
        """A batch of `hits` leaves now."""
        self._in_flight += hits
        self._peak = max(self._peak, self._in_flight)

    def cancelled(self, hits: int) -> None:
        """A batch of `hits` was cancelled before its answer: no longer in flight."""
        self._in_flight = max(0, self._in_flight - hits)

    def backlog(self) -> None:
        """More hits wait than the limits let go: the limits are what holds them."""
        self._backlog = True

    def too_large(self, hits: int) -> None:
        """A batch of `hits` was refused as too large (HTTP 413): smaller ones from now on."""
        self.batch = max(1, min(self.batch, hits // 2))
        # And never that large again: growing back into the server's limit costs a 413.
        self.max_batch = max(1, min(self.max_batch, hits - 1))

    def answered(self, hits: int, seconds: float, now: float, *, pushed_back: bool) -> None:
        """Matomo answered a batch of `hits` after `seconds`.

        `pushed_back`: it asked for less (429, 5xx), or did not answer in time
        or at all.
        """
        self._in_flight = max(0, self._in_flight - hits)
        if now - seconds < self._last_cut:
            # Sent before the last cut: its answer was part of what caused the cut,
            # or says nothing of the new limits. Cutting again for each answer of
            # one burst (16 slow answers halving 16 batches in flight down to 1)
            # would take many rounds to grow back; one cut per round, as Vector
            # and TCP do. Only the batch size still follows a slow answer.
            if seconds > self._cut:
                self._shrink_batch(hits, seconds)
            return
        last_at, self._last_at = self._last_at, now
        if self._window_end is None:
            # The first answer since the last cut: the window starts now (the very
            # first one is short: the first batches are answered together).
            self._window_end = now + max(MIN_WINDOW, self._baseline or 0.0)
            self._peak = max(self._peak, self._in_flight + hits)
        if pushed_back:
            self._decrease(BACK_OFF, now)
            # Halved down to the initial size, never raised: a batch cut for slow
            # answers or a 413 stays cut. A timeout is a push-back that also says
            # how slow the answers got: the cut below applies to it too.
            self.batch = min(self.batch, max(INITIAL_BATCH, self.batch // 2))
            if seconds > self._cut:
                self._shrink_batch(hits, seconds)
            return
        if seconds > self._cut:
            # Close to the timeout already: less in flight, smaller batches, now.
            self._decrease(BACK_OFF, now)
            self._shrink_batch(hits, seconds)
            return
        self._answered += 1
        self._sum_rtt += seconds
        self._max_rtt = max(self._max_rtt, seconds)
        self._answered_hits += hits
        if seconds < self._min_rtt:
            self._min_rtt, self._min_hits = seconds, hits
        # One by one, this batch was taken after it was sent and after the answer
        # before it was given: a Matomo taking hits one by one spent no more on it.
        started = now - seconds if last_at is None else max(last_at, now - seconds)
        self._serial = min(self._serial, max(0.0, now - started) / max(1, hits))
        # A window lasts an answer time, or until every slot was answered once.
        if now >= self._window_end or self._answered >= self.concurrency:
            self._judge_window(now)

    def pace(self) -> float:
        """Seconds between two batches sent one after the other from a backlog.

        The batches in flight spread over an answer time, at most MAX_PACE apart;
        0 until an answer time is known.
        """
        if self._baseline is None or self.concurrency <= 1:
            return 0.0
        return min(MAX_PACE, self._baseline / self.concurrency)

    # -- decisions --------------------------------------------------------------------

    def _shrink_batch(self, hits: int, seconds: float) -> None:
        # A batch of `hits` took `seconds`: as many hits as fit in the time aimed at.
        self.batch = max(1, min(self.batch, math.floor(hits * self._too_slow / seconds)))

    def _decrease(self, factor: float, now: float) -> None:
        self.concurrency = max(1, math.floor(self.concurrency * factor))
        self._last_cut = now
        self._slow_start = False
        self._prev = None
        # Answers to what was sent before the cut say nothing about the new limits:
        # the next window starts with the next answer and lasts an answer time.
        self._new_window()

    def _judge_window(self, now: float) -> None:
        mean = self._sum_rtt / self._answered
        baseline = self._baseline
        if baseline is not None and (
            mean > baseline * RISE + RISE_MARGIN
            # Above the target and rising: a step too far (the last growth).
            or (self._max_rtt > self._too_slow and mean > baseline * STEP_RISE)
        ):
            self._decrease(SLOWER, now)
            # The slower answers are the new normal to compare with.
            self._baseline = mean
            return
        self._baseline = (
            mean if baseline is None else baseline + BASELINE_WEIGHT * (mean - baseline)
        )
        if self._backlog:
            self._grow()
        elif self.batch < min(INITIAL_BATCH, self.max_batch) and self._max_rtt * 2 < self._too_slow:
            # A batch cut below the initial size (slow answers, timeouts of an outage)
            # comes back to it while answers allow, backlog or not: a spool replayed,
            # or light traffic, would otherwise go out a few hits per request for good.
            self.batch = min(INITIAL_BATCH, self.max_batch, self.batch * 2)
        self._new_window(now + max(MIN_WINDOW, self._baseline))

    def _grow(self) -> None:
        peak = max(1, self._peak)
        slowest = self._max_rtt
        if slowest >= self._too_slow:
            return
        # Seconds each more hit in flight adds to an answer, from how the answers of
        # this window spread: batches in flight together are answered one after the
        # other by a Matomo that takes them one by one, together by one that does
        # not. From a single answer: as if Matomo took the hits one by one. Either
        # way, no more than such a Matomo can have spent on a hit: a spread it could
        # not produce (batches answered together, late) is not a cost of the hits.
        estimates = []
        fixed = 0.0
        if self._answered > 1:
            between = self._answered_hits - self._min_hits
            estimates.append(min(self._serial, (slowest - self._min_rtt) / max(1, between)))
            fixed = max(0.0, self._min_rtt - self._min_hits * estimates[0])
        if self._prev is not None:
            # And from how the slowest answer changed since the hits in flight last grew.
            before, before_slowest = self._prev
            if peak > before:
                estimates.append((slowest - before_slowest) / (peak - before))
        per_hit = max(estimates) if estimates else min(self._serial, slowest / peak)
        limit = self.concurrency * self.batch
        growth = MAX_GROWTH if self._slow_start else 1.0 + 1.0 / self.concurrency
        target = max(limit, peak * growth)
        if per_hit > 0:
            # The expected slowest answer with more in flight stays below the limit.
            target = min(target, (self._too_slow - fixed) / per_hit)
        if target < limit + 1:
            return
        self._prev = (peak, slowest)
        # Larger batches first (fewer requests for the same hits), then more of them.
        self.batch = min(self.max_batch, max(self.batch, math.floor(target / self.concurrency)))
        self.concurrency = min(
            self.max_concurrency, max(self.concurrency, math.floor(target / self.batch))
        )
