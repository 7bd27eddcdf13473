"""What happens to one batch: sent, retried, split, resent without the token, or given up.

`Delivery.deliver` posts a batch until Matomo has taken it, refused it, or the
time allowed ran out, and returns the hits it could not deliver (the caller
spools or drops them). The decisions it follows live without I/O in `_bulk`
(what an answer means), `_token` (when the token goes along) and `_retry` (how
long to wait).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

from ._adaptive import Controller
from ._bulk import Answer, Kind
from ._hit import UNAUTHENTICATED_MAX_AGE, Hit
from ._report import WHY, Reporter
from ._retry import retry_delay
from ._token import TokenPolicy, TokenState, auth_hits
from ._transport import Transport

__all__ = ["Batch", "Delivery", "Slots"]

logger = logging.getLogger("asgi_matomo")


class Batch:
    """Hits being delivered; `hits` shrinks to what is still undelivered."""

    __slots__ = ("first_seq", "hits", "retry_after", "tracked", "worker")

    def __init__(self, hits: list[Hit], first_seq: int, *, worker: bool) -> None:
        self.hits = hits
        self.first_seq = first_seq
        self.tracked = 0
        # The Retry-After (seconds) of the answer the batch was given up on, if any.
        self.retry_after: float | None = None
        # Batches of the background worker are spooled by aclose() when cancelled;
        # direct-mode batches belong to their request's task.
        self.worker = worker


class Slots:
    """Room for batches in flight: as many as the controller's `concurrency` says now."""

    __slots__ = ("_changed", "_controller", "busy")

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self.busy = 0
        self._changed = anyio.Event()

    def full(self) -> bool:
        return self.busy >= self._controller.concurrency

    async def acquire(self) -> None:
        # The limit changes only when an answer arrives, and every answer is
        # followed by a release (or a retry of a batch that keeps its slot).
        while self.busy >= self._controller.concurrency:
            await self._changed.wait()
        self.busy += 1
        # Like a semaphore: the batch just started runs before the next is cut.
        await anyio.lowlevel.checkpoint()

    def release(self) -> None:
        self.busy -= 1
        self._changed.set()
        self._changed = anyio.Event()


class Delivery:
    """Delivers batches with retries; one per process (a forked child makes its own)."""

    def __init__(
        self,
        *,
        transport: Transport,
        controller: Controller,
        tokens: TokenPolicy,
        token: str | None,
        reporter: Reporter,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._transport = transport
        self._controller = controller
        self._tokens = tokens
        self._token = token
        self._reporter = reporter
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        # Set when shutdown begins: it bounds every batch's retries from then on.
        self.shutdown_deadline: float | None = None
        # Backoff sleeps of the worker's batches, cut short when shutdown begins.
        self._backoffs: set[anyio.CancelScope] = set()
        self.token_lock: tuple[anyio.lowlevel.EventLoopToken, anyio.Lock] | None = None

    def shut_down(self, deadline: float) -> None:
        """Shutdown begins: retries end by `deadline`, and sleeping batches try once more now.

        Matomo may be back: batches sleeping off an outage try again within the
        deadline instead of holding their slots to the end.
        """
        self.shutdown_deadline = deadline
        for backoff in self._backoffs:
            backoff.cancel()

    async def deliver(self, batch: Batch, *, span: float, attempts: int | None = None) -> list[Hit]:
        """Deliver `batch.hits`, retrying; returns the hits that could not be delivered."""
        tokens = self._tokens
        # A rejected token goes again, when due, with the next batch that needs it.
        if tokens.rejected and self._needs_token(batch.hits) and tokens.reconsider(self._clock()):
            logger.debug("asgi_matomo: trying the rejected access_token again")
        # Until Matomo has confirmed the token, batches that need it go one at a
        # time (in direct mode too: a burst of requests must not send it side by
        # side): a wrong token then costs a couple of failed logins, not dozens,
        # and Matomo blocks the IP after about 20.
        if tokens.unproven and self._needs_token(batch.hits):
            async with self._token_lock_here():
                return await self._deliver_unlocked(batch, span, attempts, locked=True)
        return await self._deliver_unlocked(batch, span, attempts, locked=False)

    def _needs_token(self, hits: list[Hit]) -> bool:
        return self._tokens.needed_by(hits, self._wall_clock())

    def _token_lock_here(self) -> anyio.Lock:
        loop = anyio.lowlevel.current_token()
        if self.token_lock is None or self.token_lock[0] != loop:
            self.token_lock = (loop, anyio.Lock())
        return self.token_lock[1]

    async def _deliver_unlocked(
        self, batch: Batch, span: float, attempts: int | None, *, locked: bool
    ) -> list[Hit]:
        # A batch that finds a confirmed token in doubt takes the token lock for its
        # probe: the batches that would send the token meanwhile wait for the verdict.
        held: list[anyio.Lock] = []
        try:
            return await self._attempts(batch, span, attempts, locked=locked, held=held)
        finally:
            for lock in held:
                lock.release()

    async def _attempts(
        self,
        batch: Batch,
        span: float,
        attempts: int | None,
        *,
        locked: bool,
        held: list[anyio.Lock],
    ) -> list[Hit]:
        give_up_at = self._clock() + span
        attempt = token_errors = 0
        without_token = probing = False
        while True:
            # Every request with a wrong token is a failed login: it goes only with
            # the batches that need it.
            authenticated = (
                not without_token and self._tokens.in_use and self._needs_token(batch.hits)
            )
            if authenticated and self._tokens.unproven and not locked and not held:
                # The token was put in doubt since this batch began (tried again
                # after a rejection, or revoked): it waits for the verdict, as
                # the batches that begin now do, rather than carry it beside the probe.
                await self._hold_token_lock(locked, held)
                continue
            if not authenticated:
                batch.hits = self._drop_too_old(batch.hits)
            hits = batch.hits
            if not hits:
                return []
            sent_as = self._tokens.state if authenticated else TokenState.NONE
            answer = await self._post(hits, authenticated=authenticated)
            if answer.kind is Kind.OK:
                batch.tracked += answer.tracked
                resend = self._settle(hits, answer, sent_as=sent_as, probing=probing)
                if resend is None:
                    batch.hits = []
                    return []
                batch.hits, without_token = resend, True
                if self._tokens.probing(sent_as):
                    probing = True
                    await self._hold_token_lock(locked, held)
                continue
            if answer.kind is Kind.REFUSED:
                if authenticated and answer.status in (401, 403):
                    self._reject_token(f"HTTP {answer.status}")
                    continue
                if (
                    authenticated
                    and 400 <= (answer.status or 0) < 500
                    and answer.status != 413
                    and self._tokens.doubts_refusal(sent_as)
                ):
                    # The whole batch again, without the token and cip: taken, the
                    # token was what Matomo (QueuedTracking) refused.
                    without_token = True
                    probing = self._tokens.probing(sent_as)
                    if probing:
                        await self._hold_token_lock(locked, held)
                    continue
                if answer.status == 413 and len(hits) > 1:
                    self._controller.too_large(len(hits))
                    return await self._deliver_halves(
                        batch, give_up_at - self._clock(), locked=locked or bool(held)
                    )
                self._refused(hits, answer)
                batch.hits = []
                return []
            attempt += 1
            # Matomo answers 500 to a blocked IP (MATOMO.md); 502-504 and 429 come from an
            # overloaded Matomo or proxy, for which a lucky answer without the token
            # would reject a good token for good.
            if authenticated and answer.status == 500:
                token_errors += 1
                if self._may_probe_lockout(token_errors) and await self._probe_lockout(batch):
                    continue
            delay = retry_delay(attempt, answer.retry_after)
            # Shutdown may begin while a batch is retrying: it bounds the retries too.
            limit = give_up_at
            if self.shutdown_deadline is not None:
                limit = min(limit, self.shutdown_deadline)
            if (attempts is not None and attempt >= attempts) or self._clock() + delay > limit:
                # What comes next for these hits (the spool's replay) waits as asked too.
                batch.retry_after = answer.retry_after
                self._reporter.warn(
                    "gave_up",
                    "asgi_matomo: Matomo unavailable (%s): giving up on a batch%s",
                    answer.cause,
                    " at the shutdown deadline (shutdown_timeout)" if limit < give_up_at else "",
                )
                return hits
            self._reporter.warn(
                "retry", "asgi_matomo: Matomo unavailable (%s): retrying", answer.cause
            )
            self._reporter.counters.retried += 1
            await self._backoff(delay, wake_on_close=batch.worker)
            if answer.cause == "timeout" and len(batch.hits) > self._controller.batch:
                # Too large to be answered in time: resent whole, it would time out
                # again (and be stored again by a Matomo that stores it late).
                return await self._deliver_halves(
                    batch, give_up_at - self._clock(), locked=locked or bool(held), too_slow=True
                )

    async def _hold_token_lock(self, locked: bool, held: list[anyio.Lock]) -> None:
        """Batches that would send the token wait for the verdict of a probe."""
        if not locked and not held:
            lock = self._token_lock_here()
            await lock.acquire()
            held.append(lock)

    async def _post(self, hits: list[Hit], *, authenticated: bool) -> Answer:
        self._reporter.counters.batches += 1
        controller = self._controller
        controller.sent(len(hits))
        started = self._clock()
        try:
            answer = await self._transport.post(hits, authenticated=authenticated)
        except BaseException:  # cancelled: no answer to judge
            controller.cancelled(len(hits))
            raise
        now = self._clock()
        controller.answered(len(hits), now - started, now, pushed_back=answer.kind is Kind.RETRY)
        return answer

    async def _backoff(self, delay: float, *, wake_on_close: bool) -> None:
        """Sleep before a retry; a worker batch's sleep ends when shutdown begins."""
        # Once closing, the delay fits in the shutdown deadline: no need to wake it.
        if not wake_on_close or self.shutdown_deadline is not None:
            await self._sleep(delay)
            return
        with anyio.CancelScope() as scope:
            self._backoffs.add(scope)
            try:
                await self._sleep(delay)
            finally:
                self._backoffs.discard(scope)

    def _may_probe_lockout(self, token_errors: int) -> bool:
        """Whether a batch that got `token_errors` HTTP 500 answers with the token tries without."""
        return self._tokens.may_probe_lockout(token_errors, self._clock)

    async def _deliver_halves(
        self, batch: Batch, span: float, *, locked: bool, too_slow: bool = False
    ) -> list[Hit]:
        """Send a batch too large for the server (413), or for Matomo's answer time, as two."""
        if too_slow:
            self._reporter.log_once(
                "too_slow",
                logging.WARNING,
                "asgi_matomo: a batch of %d hits was not answered within http_timeout; "
                "sending smaller ones. Raise http_timeout if Matomo is this slow.",
                len(batch.hits),
            )
        else:
            self._reporter.log_once(
                "413",
                logging.WARNING,
                "asgi_matomo: a batch of %d hits was too large for the server (HTTP 413); "
                "sending smaller ones. Lower batch_size or raise the server's body size limit.",
                len(batch.hits),
            )
        left: list[Hit] = []
        mid = len(batch.hits) // 2
        first, second = batch.hits[:mid], batch.hits[mid:]
        for part, rest in ((first, second), (second, [])):
            half = Batch(part, batch.first_seq, worker=batch.worker)
            try:
                left += await self._deliver_unlocked(half, max(span, 0.0), None, locked=locked)
            except BaseException:
                # Cancelled (aclose past its deadline): what aclose() spools is what
                # is not delivered yet, down to the halves of halves.
                batch.hits = left + half.hits + rest
                raise
            finally:
                batch.tracked += half.tracked
            batch.hits = left + rest
        return left

    async def _probe_lockout(self, batch: Batch) -> bool:
        """True when Matomo takes without the token what it answered 5xx to with it.

        Matomo answers HTTP 500 to every authenticated bulk request from an IP it
        blocked after about 20 failed logins (a wrong token, maybe sent by other
        processes or earlier runs): "down" and "locked out" look the same until a
        request without the token tells them apart.
        """
        now = self._wall_clock()
        fresh = [h for h in batch.hits if not h.too_old(now, authenticated=False)]
        if not fresh:
            return False
        answer = await self._post(fresh, authenticated=False)
        if answer.kind is not Kind.OK:
            return False
        self._reject_token(
            "HTTP 5xx with it, accepted without it: a wrong token, or this server's IP "
            "is blocked after failed logins"
        )
        batch.tracked += answer.tracked
        self._settle(fresh, answer, sent_as=TokenState.NONE, probing=False)
        sent = {id(h) for h in fresh}
        batch.hits = [h for h in batch.hits if id(h) not in sent]
        return True

    def _settle(
        self, hits: list[Hit], answer: Answer, *, sent_as: TokenState, probing: bool
    ) -> list[Hit] | None:
        """Count a 2xx answer; returns the hits to resend without the token, if any.

        `sent_as` is the token's state when the batch was sent with it,
        `TokenState.NONE` when it was sent without.
        """
        counters = self._reporter.counters
        counters.sent += answer.tracked
        carrying = auth_hits(hits)
        tokens = self._tokens
        if tokens.doubts(sent_as, len(carrying), answer.invalid):
            return carrying
        if tokens.recovered:
            tokens.recovered = False
            logger.info(
                "asgi_matomo: Matomo accepts the access_token again: visitor IPs (cip) "
                "are sent again"
            )
        counters.invalid += answer.invalid
        if probing:
            self._conclude_probe(answer, len(hits))
        if answer.invalid:
            self._reporter.warn(
                "invalid",
                "asgi_matomo: Matomo counted %d of %d hits invalid (wrong idsite? bad parameter?)",
                answer.invalid,
                len(hits),
            )
        return None

    def _conclude_probe(self, answer: Answer, n: int) -> None:
        if answer.tracked == n:
            self._reject_token("hits with cip were invalid with it, tracked without it")
        elif answer.tracked == 0:
            self._reporter.log_once(
                "idsite",
                logging.ERROR,
                "asgi_matomo: Matomo refused every hit of a batch, with and without the "
                "access_token: the site id (idsite) is probably wrong or the site does not "
                "exist in this Matomo. Check idsite and the Matomo URL.",
            )

    def _reject_token(self, why: str) -> None:
        tokens = self._tokens
        if not tokens.reject(self._clock()):
            return
        minutes = max(0.0, (tokens.reconsider_at or 0.0) - self._clock()) / 60
        if tokens.refusals > 1:
            # A token tried again and still refused: said at INFO, once an hour at most.
            logger.info(
                "asgi_matomo: Matomo still rejects the access_token (%s); "
                "trying it again in %.0f minutes",
                why,
                minutes,
            )
            return
        # Said again only if the token was accepted meanwhile (once an hour at most).
        logger.error(
            "asgi_matomo: Matomo rejected the access_token (%s). Tracking continues "
            "without it: visitor IPs (cip) are not sent and hits older than 24 h are "
            "dropped. Fix: use the token_auth of a Matomo user with write access to the "
            "site (Administration > Personal > Security > Auth tokens). The token is "
            "tried again in %.0f minutes, and every hour while refused, without a restart.",
            why,
            minutes,
        )

    def _refused(self, hits: list[Hit], answer: Answer) -> None:
        self._reporter.counters.rejected += len(hits)
        body = answer.cause
        if self._token:
            body = body.replace(self._token, "***")
        if answer.foreign:
            self._reporter.log_once(
                f"foreign:{body}",
                logging.ERROR,
                "asgi_matomo: the Matomo URL does not look like Matomo's tracking endpoint "
                "(matomo.php): a batch of %d hits was answered %s. Nothing was recorded; "
                "the hits are counted as rejected, not retried. Check matomo_url "
                "(logged once per distinct answer).",
                len(hits),
                body,
            )
            return
        self._reporter.log_once(
            f"{answer.status}:{body}",
            logging.ERROR,
            "asgi_matomo: Matomo refused a batch of %d hits with HTTP %s: %s "
            "(not retried; logged once per distinct answer)",
            len(hits),
            answer.status,
            body,
        )

    def _drop_too_old(self, hits: list[Hit]) -> list[Hit]:
        now = self._wall_clock()
        # Hit.too_old(now, authenticated=False), inlined: this runs for every hit sent.
        keep = [h for h in hits if now - h.timestamp < UNAUTHENTICATED_MAX_AGE]
        if len(keep) != len(hits):
            self._reporter.drop(len(hits) - len(keep), "too_old", WHY["too_old"])
        return keep
