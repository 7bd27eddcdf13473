"""What the sender does with `access_token`: the decisions, without I/O.

Matomo counts every request that carries a wrong token as a failed login and,
after about 20, blocks the sender's IP for all authenticated tracking (MATOMO.md).
So the token goes only with the batches that need it, is proven on a few of them
before it is used freely, and is doubted again when Matomo's answers suggest it
was revoked. A rejected token is tried again every hour (an admin may have fixed its
permission meanwhile): each try is one failed login at most.
The sender asks this policy and does the sending and the logging.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence

from ._hit import UNAUTHENTICATED_MAX_AGE, Hit

# Until Matomo has confirmed the token, this many all-invalid batches are resent
# without it to find out whether the token or something else is wrong.
TOKEN_PROBES = 3
# A batch sent with a not yet confirmed token that gets this many HTTP 500 answers is
# tried once without it: Matomo answers 500 to an IP it locked out.
LOCKOUT_PROBE_AFTER = 2
# A confirmed token can be revoked, or the IP blocked by failed logins of other
# processes: 500 answers to it are tried without it too, at most once per this many seconds.
LOCKOUT_PROBE_INTERVAL = 60.0
# A hit this old (seconds) goes with the token, when there is one: Matomo wants it for a
# cdt older than 24 h. The hour of margin covers retries and clock skew with Matomo.
TOKEN_AGE = UNAUTHENTICATED_MAX_AGE - 3600.0
# A rejected token goes again with one batch (a probe) this many seconds after it was
# rejected, and again after as long each time Matomo still refuses it (an admin may
# have fixed its permission meanwhile). Each try is one failed login; Matomo blocks an
# IP after 20 within 60 minutes (its defaults). An hour apart, no two tries of a
# process, nor a try and the rejection it follows, fall within the same 60 minutes:
# the failed logins of any hour stay what the rejection itself costs, whatever the
# number of workers sharing the IP. Sooner would add up: a try 10 minutes after a
# rejection doubles the failed logins of that hour.
RECONSIDER_AFTER = 3600.0
# Each wait is lengthened by up to this share: processes that found the token rejected
# together do not all probe in the same instant.
RECONSIDER_JITTER = 0.1


class TokenState(enum.Enum):
    NONE = "none"  # no access_token configured
    UNKNOWN = "unknown"  # configured, not yet confirmed by Matomo
    VERIFIED = "verified"
    REJECTED = "rejected"


def auth_hits(hits: Sequence[Hit]) -> list[Hit]:
    """The hits Matomo refuses without a valid token (they carry cip)."""
    return [h for h in hits if h.cip is not None]


class TokenPolicy:
    """The token's state, and what each answer of Matomo says about it."""

    __slots__ = (
        "_rand",
        "lockout_probed_at",
        "probes_left",
        "reconsider_at",
        "recovered",
        "refusals",
        "state",
    )

    def __init__(self, configured: bool, rand: Callable[[], float] = random.random) -> None:
        self.state = TokenState.UNKNOWN if configured else TokenState.NONE
        self.probes_left = TOKEN_PROBES
        self.lockout_probed_at: float | None = None
        self._rand = rand
        # Rejections in a row, the last one's included; 0 once Matomo accepts the token.
        self.refusals = 0
        # When (monotonic) a rejected token is tried again.
        self.reconsider_at: float | None = None
        # Set when a token rejected before was accepted: the sender says so, once.
        self.recovered = False

    @property
    def in_use(self) -> bool:
        """Whether batches that need the token get it."""
        return self.state in (TokenState.UNKNOWN, TokenState.VERIFIED)

    @property
    def unproven(self) -> bool:
        """Configured and not yet confirmed: batches with it go one at a time."""
        return self.state is TokenState.UNKNOWN

    @property
    def rejected(self) -> bool:
        return self.state is TokenState.REJECTED

    def needed_by(self, hits: Sequence[Hit], now: float) -> bool:
        """True when a hit carries cip or is (nearly) too old to track without the token."""
        oldest = now - TOKEN_AGE
        return any(h.cip is not None or h.timestamp <= oldest for h in hits)

    def may_probe_lockout(self, token_errors: int, clock: Callable[[], float]) -> bool:
        """Whether a batch that got `token_errors` HTTP 500 answers with the token tries without.

        `clock` (monotonic) is read only when the answer depends on it.
        """
        if self.state is TokenState.UNKNOWN:
            return token_errors == LOCKOUT_PROBE_AFTER
        # Verified: a revoked token or an IP blocked by other processes' failed logins
        # look like Matomo being down; checked now and then, not by every batch.
        if token_errors < LOCKOUT_PROBE_AFTER:
            return False
        now = clock()
        last = self.lockout_probed_at
        if last is not None and now - last < LOCKOUT_PROBE_INTERVAL:
            return False
        self.lockout_probed_at = now
        return True

    def doubts(self, sent_as: TokenState, carrying: int, invalid: int) -> bool:
        """After a 2xx answer to a batch sent with the token: resend its cip hits without it?

        `sent_as` is the token's state when the batch left, `carrying` the number
        of its hits with cip, `invalid` what Matomo counted invalid.
        """
        if sent_as is TokenState.NONE or not carrying:
            return False
        # The pattern of a token Matomo does not accept: exactly the hits carrying
        # cip were refused, the others tracked.
        suspect = invalid == carrying
        if self.state is TokenState.UNKNOWN and invalid == 0:
            self.state = TokenState.VERIFIED
            self.recovered = self.refusals > 0
            self.refusals = 0
            self.reconsider_at = None
            return False
        if suspect and (sent_as is TokenState.VERIFIED or self.state is TokenState.REJECTED):
            # A token that worked before may have been revoked or rotated: find out
            # again before its failed logins get this server's IP blocked. Every
            # batch sent with it meanwhile is resent without it (as those sent before
            # it was found out), outside the probe budget.
            if self.state is TokenState.VERIFIED:
                self.state = TokenState.UNKNOWN
                self.probes_left = TOKEN_PROBES
            return True
        # Resending the cip hits without the token tells a bad token from a bad idsite.
        return suspect and self.state is TokenState.UNKNOWN and self.probes_left > 0

    def doubts_refusal(self, sent_as: TokenState) -> bool:
        """After a 4xx answer to a batch sent with the token: resend it all without it?

        QueuedTracking checks the token when it queues a request, and answers a
        bulk that carries cip with a token it rejects with 400 for the whole batch
        (MATOMO.md): a probe without the token and cip tells that from a batch
        Matomo refuses for another reason.
        """
        if sent_as is TokenState.NONE:
            return False
        if self.state is TokenState.VERIFIED:
            # Revoked since: prove it again (one probe now, batches one at a time).
            self.state = TokenState.UNKNOWN
            self.probes_left = TOKEN_PROBES
            return True
        return self.state is TokenState.UNKNOWN and self.probes_left > 0

    def probing(self, sent_as: TokenState) -> bool:
        """A resend without the token begins: whether it is a probe of the token.

        A probe made after a batch sent with an unproven token uses up one of the
        probes; one made for a token in doubt after it had worked does not.
        """
        if self.state is not TokenState.UNKNOWN:
            return False
        if sent_as is TokenState.UNKNOWN:
            self.probes_left -= 1
        return True

    def reject(self, now: float) -> bool:
        """Matomo refused the token (`now`: a monotonic reading); False when it already was.

        The token is tried again RECONSIDER_AFTER seconds later, plus up to
        RECONSIDER_JITTER more.
        """
        if self.state is TokenState.REJECTED:
            # Batches that left with the token before the verdict come back: one rejection.
            return False
        self.state = TokenState.REJECTED
        self.refusals += 1
        self.reconsider_at = now + RECONSIDER_AFTER * (1.0 + RECONSIDER_JITTER * self._rand())
        return True

    def reconsider(self, now: float) -> bool:
        """Whether a rejected token is due to be tried again; if so, it is, from now on.

        The next batch that needs the token carries it, as a token not yet
        confirmed: alone, with one probe without it (the cip pattern, a 4xx, the
        500 lockout check) to tell whether it is still refused.
        """
        if self.state is not TokenState.REJECTED or self.reconsider_at is None:
            return False
        if now < self.reconsider_at:
            return False
        self.state = TokenState.UNKNOWN
        self.probes_left = 1
        return True
