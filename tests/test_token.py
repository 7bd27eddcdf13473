"""The access_token policy on its own: states and probes, no I/O (asgi_matomo._token)."""

from __future__ import annotations

from collections.abc import Callable

from asgi_matomo._hit import Hit
from asgi_matomo._token import (
    LOCKOUT_PROBE_AFTER,
    LOCKOUT_PROBE_INTERVAL,
    RECONSIDER_AFTER,
    RECONSIDER_JITTER,
    TOKEN_AGE,
    TOKEN_PROBES,
    TokenPolicy,
    TokenState,
    auth_hits,
)

NOW = 1_700_000_000.0
UNKNOWN, VERIFIED, REJECTED, NONE = (
    TokenState.UNKNOWN,
    TokenState.VERIFIED,
    TokenState.REJECTED,
    TokenState.NONE,
)


def test_without_a_token_nothing_is_sent_with_one() -> None:
    policy = TokenPolicy(configured=False)
    assert (policy.state, policy.in_use, policy.unproven) == (NONE, False, False)
    assert not policy.doubts(NONE, carrying=3, invalid=3)


def test_a_batch_tracked_in_full_proves_the_token() -> None:
    policy = TokenPolicy(configured=True)
    assert (policy.in_use, policy.unproven) == (True, True)
    assert not policy.doubts(UNKNOWN, carrying=2, invalid=0)
    assert (policy.state, policy.unproven) == (VERIFIED, False)


def test_an_unproven_token_is_probed_a_few_times_then_given_up_on() -> None:
    # Exactly the cip hits invalid: a wrong token, or a wrong idsite; a resend
    # without the token tells which, but only TOKEN_PROBES times.
    policy = TokenPolicy(configured=True)
    verdicts = []
    for _ in range(TOKEN_PROBES + 2):
        doubt = policy.doubts(UNKNOWN, carrying=2, invalid=2)
        verdicts.append(doubt)
        if doubt:
            assert policy.probing(UNKNOWN)
    assert verdicts == [True] * TOKEN_PROBES + [False, False]
    assert policy.state is UNKNOWN
    # Some hits invalid but not exactly those with cip: not the token's pattern.
    assert not TokenPolicy(configured=True).doubts(UNKNOWN, carrying=2, invalid=1)


def test_a_token_that_worked_is_doubted_again_outside_the_probe_budget() -> None:
    policy = TokenPolicy(configured=True)
    policy.doubts(UNKNOWN, carrying=1, invalid=0)
    policy.probes_left = 0
    assert policy.doubts(VERIFIED, carrying=3, invalid=3)
    assert (policy.state, policy.probes_left) == (UNKNOWN, TOKEN_PROBES)
    # That resend is a probe, but does not use one up.
    assert policy.probing(VERIFIED)
    assert policy.probes_left == TOKEN_PROBES
    # A batch that left while the token was still trusted, answered after it was
    # rejected: its cip hits go again without the token.
    policy.reject(NOW)
    assert policy.doubts(VERIFIED, carrying=2, invalid=2)
    assert (policy.rejected, policy.in_use, policy.probing(VERIFIED)) == (True, False, False)


def test_lockout_probes_once_for_an_unproven_token_then_once_a_minute() -> None:
    unproven = TokenPolicy(configured=True)
    # The clock is read only when the answer depends on it.
    reads: list[float] = []

    def at(t: float) -> Callable[[], float]:
        def clock() -> float:
            reads.append(t)
            return t

        return clock

    tries = [unproven.may_probe_lockout(n, at(NOW)) for n in range(1, LOCKOUT_PROBE_AFTER + 2)]
    assert tries == [False] * (LOCKOUT_PROBE_AFTER - 1) + [True, False]
    assert reads == []

    verified = TokenPolicy(configured=True)
    verified.doubts(UNKNOWN, carrying=1, invalid=0)
    assert not verified.may_probe_lockout(LOCKOUT_PROBE_AFTER - 1, at(NOW))
    assert reads == []
    assert verified.may_probe_lockout(LOCKOUT_PROBE_AFTER, at(NOW))
    assert not verified.may_probe_lockout(LOCKOUT_PROBE_AFTER + 5, at(NOW + 1))
    assert verified.may_probe_lockout(LOCKOUT_PROBE_AFTER, at(NOW + LOCKOUT_PROBE_INTERVAL))


def test_the_token_goes_with_visitor_ips_and_with_hits_close_to_a_day_old() -> None:
    policy = TokenPolicy(configured=True)
    fresh, with_ip = Hit("a=1", NOW), Hit("a=2", NOW, "203.0.113.7")
    old = Hit("a=3", NOW - TOKEN_AGE)
    assert not policy.needed_by([fresh], NOW)
    assert policy.needed_by([fresh, with_ip], NOW)
    assert policy.needed_by([fresh, old], NOW)
    assert auth_hits([fresh, with_ip, old]) == [with_ip]


def test_a_refusal_of_a_batch_with_the_token_is_probed_like_invalid_hits() -> None:
    # QueuedTracking answers 400 to a whole bulk with cip and a token it rejects.
    policy = TokenPolicy(configured=True)
    assert not policy.doubts_refusal(NONE)  # sent without the token: not its fault
    verdicts = []
    for _ in range(TOKEN_PROBES + 1):
        doubt = policy.doubts_refusal(UNKNOWN)
        verdicts.append(doubt)
        if doubt:
            assert policy.probing(UNKNOWN)
    assert verdicts == [True] * TOKEN_PROBES + [False]
    # A token that worked and is refused now is proven again, with a fresh budget.
    verified = TokenPolicy(configured=True)
    verified.state = VERIFIED
    assert verified.doubts_refusal(VERIFIED)
    assert (verified.state, verified.probes_left) == (UNKNOWN, TOKEN_PROBES)
    assert verified.probing(VERIFIED)
    assert verified.probes_left == TOKEN_PROBES  # outside the budget, as for invalid hits
    rejected = TokenPolicy(configured=True)
    rejected.reject(NOW)
    assert not rejected.doubts_refusal(UNKNOWN)


def refused_until(policy: TokenPolicy, now: float) -> float:
    """Reject the token at `now`; returns when it is tried again (and checks it is not before)."""
    assert policy.reject(now)
    due = policy.reconsider_at
    assert due is not None
    assert not policy.reconsider(due - 0.001)
    assert policy.rejected
    return due


def test_a_rejected_token_is_tried_again_every_hour_while_refused() -> None:
    policy = TokenPolicy(configured=True, rand=lambda: 0.0)
    now, waits = 0.0, []
    for _ in range(6):
        due = refused_until(policy, now)
        waits.append(due - now)
        assert policy.reconsider(due)
        # Tried again as a token not yet confirmed: one batch at a time, one probe.
        assert (policy.state, policy.in_use, policy.unproven) == (UNKNOWN, True, True)
        assert policy.probes_left == 1
        assert policy.doubts(UNKNOWN, carrying=2, invalid=2)  # still refused: the probe
        assert policy.probing(UNKNOWN)
        assert not policy.doubts(UNKNOWN, carrying=2, invalid=2)  # no second probe
        now = due
    assert waits == [3600.0] * 6


def test_a_reconsidered_token_accepted_is_back_to_normal_once() -> None:
    policy = TokenPolicy(configured=True, rand=lambda: 0.0)
    assert not policy.reconsider(NOW)  # not rejected: nothing to reconsider
    due = refused_until(policy, NOW)
    assert policy.reconsider(due)
    assert not policy.reconsider(due + 1)  # once per rejection
    assert not policy.doubts(UNKNOWN, carrying=3, invalid=0)
    assert (policy.state, policy.recovered, policy.refusals) == (VERIFIED, True, 0)
    assert policy.reconsider_at is None
    # Revoked later: rejected anew.
    policy.recovered = False
    assert refused_until(policy, NOW + 5000) == NOW + 5000 + RECONSIDER_AFTER
    # A token accepted at its first use was never rejected: nothing to announce.
    fresh = TokenPolicy(configured=True)
    fresh.doubts(UNKNOWN, carrying=1, invalid=0)
    assert not fresh.recovered


def test_batches_coming_back_after_the_verdict_do_not_push_the_retry_back() -> None:
    policy = TokenPolicy(configured=True, rand=lambda: 0.0)
    due = refused_until(policy, NOW)
    assert not policy.reject(NOW + 60)
    assert (policy.reconsider_at, policy.refusals) == (due, 1)


def test_the_retry_of_a_rejected_token_has_jitter_that_only_lengthens_it() -> None:
    late = TokenPolicy(configured=True, rand=lambda: 1.0)
    assert refused_until(late, NOW) == NOW + RECONSIDER_AFTER * (1 + RECONSIDER_JITTER)
    for _ in range(20):
        policy = TokenPolicy(configured=True)
        wait = refused_until(policy, NOW) - NOW
        assert RECONSIDER_AFTER <= wait <= RECONSIDER_AFTER * (1 + RECONSIDER_JITTER)


def test_retrying_a_refused_token_never_adds_to_the_failed_logins_of_an_hour() -> None:
    # Each try of a token Matomo still refuses is one failed login, as is the
    # rejection. Matomo blocks an IP after 20 failed logins within 60 minutes
    # (Login plugin defaults): any 60 minutes hold one of them per process.
    for r in (0.0, 0.5, 1.0):
        policy = TokenPolicy(configured=True, rand=lambda r=r: r)  # type: ignore[misc]
        now, failed_logins = 0.0, [0.0]  # the rejection
        while now < 24 * 3600:
            now = refused_until(policy, now)
            assert policy.reconsider(now)
            failed_logins.append(now)
        per_hour = [sum(1 for t in failed_logins if s <= t < s + 3600) for s in failed_logins]
        assert max(per_hour) == 1
