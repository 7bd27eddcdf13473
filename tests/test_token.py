"""The access_token policy on its own: states and probes, no I/O (asgi_matomo._token)."""

from __future__ import annotations

from collections.abc import Callable

from asgi_matomo._hit import Hit
from asgi_matomo._token import (
    LOCKOUT_PROBE_AFTER,
    LOCKOUT_PROBE_INTERVAL,
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
    policy.reject()
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
    rejected.reject()
    assert not rejected.doubts_refusal(UNKNOWN)
