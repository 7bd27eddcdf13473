"""Hits grouped into visits the way Matomo groups them (MATOMO.md "Visitors and visits")."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from asgi_matomo._collector import StoredHit
from asgi_matomo._collector._visits import Visit, group_visits, matches, user_id_visitor_id

# 2025-11-18 09:00:00 UTC
T0 = 1763456400.0
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0.0.0 Safari/537.36"


def hit(
    id: int,
    at: float = 0.0,
    *,
    ip: str = "203.0.113.7",
    ua: str | None = FIREFOX,
    lang: str | None = "en",
    idsite: int = 1,
    **params: str,
) -> StoredHit:
    """A stored hit `at` seconds after T0, with the raw parameters given."""
    values: dict[str, Any] = {
        "id": id,
        "time": T0 + at,
        "received": T0 + at,
        "idsite": idsite,
        "hit_type": "pageview",
        "url": params.get("url", f"https://a.test/{id}"),
        "action_name": params.get("action_name"),
        "urlref": params.get("urlref"),
        "e_c": None,
        "e_a": None,
        "e_n": None,
        "e_v": None,
        "pf_srv": None,
        "search": None,
        "search_cat": None,
        "search_count": None,
        "cvar": None,
        "cvar_visit": None,
        "dimensions": {},
        "visitor_ip": ip,
        "ua": ua,
        "lang": lang,
        "uid": params.get("uid"),
        "visitor_id": None,
        "http_status": None,
        "params": {"idsite": str(idsite), "rec": "1", **params},
    }
    return StoredHit(**values)


def ids(visits: list[Visit]) -> list[list[int]]:
    """Each visit's hit ids, in the order the page shows them."""
    return [[action.id for action in visit.actions] for visit in visits]


def test_one_visitor_one_visit_actions_oldest_first() -> None:
    # Hits stamped with `cdt` may arrive out of order: actions follow the hit time.
    visits = group_visits([hit(1, 0), hit(3, 60), hit(2, 30)])
    assert ids(visits) == [[1, 2, 3]]
    (visit,) = visits
    assert (visit.visitor_id, visit.identified_by) == (None, "fingerprint")
    assert (visit.started, visit.ended) == (T0, T0 + 60)


@pytest.mark.parametrize(
    "other",
    [
        {"ip": "198.51.100.1"},
        {"ua": CHROME},
        {"lang": "fr"},
        {"idsite": 2},
    ],
)
def test_fingerprint_separates_visitors(other: dict[str, Any]) -> None:
    assert ids(group_visits([hit(1, 0), hit(2, 10, **other), hit(3, 20)])) == [[1, 3], [2]]


def test_language_compared_like_matomo() -> None:
    assert ids(group_visits([hit(1, 0, lang="en-GB, en"), hit(2, 5, lang="EN-gb,en")])) == [[1, 2]]


def test_newest_visit_first() -> None:
    visits = group_visits([hit(1, 0), hit(2, 10, ip="198.51.100.1"), hit(3, 5, ip="192.0.2.1")])
    assert ids(visits) == [[2], [3], [1]]


@pytest.mark.parametrize(("gap", "visits"), [(1800, [[1, 2]]), (1801, [[2], [1]])])
def test_thirty_minute_window(gap: float, visits: list[list[int]]) -> None:
    assert ids(group_visits([hit(1, 0), hit(2, gap)])) == visits


def test_window_counts_from_the_last_action() -> None:
    assert ids(group_visits([hit(1, 0), hit(2, 1700), hit(3, 3400)])) == [[1, 2, 3]]


def test_new_visit_at_midnight() -> None:
    before, after = 15 * 3600 - 60.0, 15 * 3600 + 60.0  # 23:59 and 00:01 UTC
    assert ids(group_visits([hit(1, before), hit(2, after)])) == [[2], [1]]


@pytest.mark.parametrize(("value", "visits"), [("1", [[2], [1]]), ("0", [[1, 2]])])
def test_new_visit_parameter(value: str, visits: list[list[int]]) -> None:
    assert ids(group_visits([hit(1, 0), hit(2, 10, new_visit=value)])) == visits


def test_action_limit_starts_a_new_visit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("asgi_matomo._collector._visits.MAX_ACTIONS_PER_VISIT", 2)
    assert ids(group_visits([hit(1, 0), hit(2, 1), hit(3, 2)])) == [[3], [1, 2]]


def test_cid_separates_visitors_with_the_same_fingerprint() -> None:
    a, b = "0123456789ABCDEF", "fedcba9876543210"
    visits = group_visits([hit(1, 0, cid=a), hit(2, 5, cid=b), hit(3, 10, cid=a)])
    assert ids(visits) == [[1, 3], [2]]
    assert [(v.visitor_id, v.identified_by) for v in visits] == [
        (a.lower(), "cid"),
        (b, "cid"),
    ]


def test_cid_joins_its_visit_from_another_address() -> None:
    cid = "0123456789abcdef"
    assert ids(group_visits([hit(1, 0, cid=cid), hit(2, 5, cid=cid, ip="198.51.100.1")])) == [
        [1, 2]
    ]


def test_cid_never_joins_a_visit_by_fingerprint() -> None:
    assert ids(group_visits([hit(1, 0), hit(2, 5, cid="0123456789abcdef")])) == [[2], [1]]


def test_different_id_same_fingerprint_is_one_visit() -> None:
    # Verified on Matomo 5.1.2: `_id` does not separate visitors whose fingerprint matches.
    visits = group_visits([hit(1, 0, _id="0123456789abcdef"), hit(2, 5, _id="fedcba9876543210")])
    assert ids(visits) == [[1, 2]]
    assert (visits[0].visitor_id, visits[0].identified_by) == ("0123456789abcdef", "_id")


def test_same_id_joins_its_visit_from_another_address() -> None:
    visitor = "0123456789abcdef"
    visits = group_visits([hit(1, 0, _id=visitor), hit(2, 5, _id=visitor, ip="198.51.100.1")])
    assert ids(visits) == [[1, 2]]


@pytest.mark.parametrize("bad", ["0123456789abcdeg", "0123", ""])
def test_id_that_is_not_16_hex_is_ignored(bad: str) -> None:
    (visit,) = group_visits([hit(1, 0, _id=bad)])
    assert (visit.visitor_id, visit.identified_by) == (None, "fingerprint")


def test_uid_gives_the_visitor_id() -> None:
    expected = hashlib.sha1(b"alice@example.org", usedforsecurity=False).hexdigest()[:16]
    assert user_id_visitor_id("alice@example.org") == expected
    visits = group_visits(
        [
            hit(1, 0),
            # Logs in: the visit goes on, and its visitor id becomes the user's.
            hit(2, 10, uid="alice@example.org"),
            # Another device, same user: the same visit, found by the visitor id.
            hit(3, 20, uid="alice@example.org", ip="198.51.100.1", ua=CHROME),
            hit(4, 30, uid="bob", ip="192.0.2.9"),
        ]
    )
    assert ids(visits) == [[4], [1, 2, 3]]
    assert (visits[1].visitor_id, visits[1].identified_by) == (expected, "uid")
    assert visits[1].uid == "alice@example.org"
    assert visits[0].uid == "bob"


def test_fingerprint_match_picks_the_most_recently_active_visit() -> None:
    cid = "0123456789abcdef"
    # Two visits with the same fingerprint (one forced by cid); a plain hit continues
    # the one whose last action is the latest (Matomo's `ORDER BY
    # visit_last_action_time DESC LIMIT 1`), here the cid's.
    visits = group_visits([hit(1, 0), hit(2, 10, cid=cid), hit(3, 20)])
    assert ids(visits) == [[2, 3], [1]]


def test_visit_json_and_referrer() -> None:
    (visit,) = group_visits(
        [hit(1, 0, urlref="https://search.test/", cip="203.0.113.7"), hit(2, 5, urlref="x")]
    )
    data = visit.to_json()
    assert data["referrer"] == "https://search.test/"
    assert data["ip_sent"] is True
    assert data["visitor_ip"] == "203.0.113.7"
    assert [action["id"] for action in data["actions"]] == [1, 2]
    assert (data["started"], data["ended"]) == (T0, T0 + 5)


def test_matches_any_text_shown() -> None:
    base = hit(1, 0, url="https://a.test/Shoes", uid="Alice")
    event = StoredHit(
        **{
            **base.__dict__,
            "id": 2,
            "e_c": "Video",
            "e_a": "Play",
            "cvar": {"1": ["plan", "premium"]},
            "dimensions": {"3": "404"},
        }
    )
    (visit,) = group_visits([base, event])
    names = {3: "http_status_code"}
    for needle in ("shoes", "ALICE", "video", "premium", "http_status", "404", "", "  "):
        assert matches(visit, needle, names), needle
    assert matches(visit, "dimension3", {})
    assert not matches(visit, "dimension3", names)
    assert not matches(visit, "hats", names)


def test_campaign_change_starts_a_new_visit() -> None:
    visits = group_visits(
        [
            hit(1, 0, url="https://a.test/?utm_campaign=Spring&utm_term=Shoes"),
            hit(2, 10, url="https://a.test/next"),
            hit(3, 20, url="https://a.test/?mtm_campaign=spring&mtm_kwd=shoes"),
            hit(4, 30, url="https://a.test/#pk_campaign=autumn"),
            hit(5, 40, url="https://a.test/?utm_source=newsletter"),
        ]
    )
    assert ids(visits) == [[5], [4], [1, 2, 3]]
    assert [visit.campaign for visit in visits] == [
        ("newsletter", ""),
        ("autumn", ""),
        ("spring", "shoes"),
    ]
    assert visits[2].referrer_kind == "campaign"


def test_campaign_from_attribution_parameters() -> None:
    visits = group_visits(
        [
            hit(1, 0, _rcn="Mail", _rck="Offer"),
            hit(2, 5, _rcn="MAIL", _rck="offer"),
            # The same name with another keyword is another campaign.
            hit(3, 10, _rcn="mail"),
        ]
    )
    assert ids(visits) == [[3], [1, 2]]
    assert visits[1].campaign == ("mail", "offer")


def test_direct_visit_takes_a_later_referrer_or_campaign() -> None:
    # A direct entry is not a referrer that changes: the visit goes on and takes it.
    visits = group_visits(
        [
            hit(1, 0, urlref="https://a.test/inside", url="https://a.test/"),
            hit(2, 10, url="https://a.test/?utm_campaign=spring"),
            hit(3, 20, url="https://a.test/?utm_campaign=summer"),
        ]
    )
    assert ids(visits) == [[3], [1, 2]]
    assert (visits[1].referrer_kind, visits[1].campaign) == ("campaign", ("spring", ""))
    (visit,) = group_visits([hit(1, 0), hit(2, 10, urlref="https://search.test/?q=a")])
    assert (visit.referrer_kind, visit.referrer) == ("website", "https://search.test/?q=a")


def test_website_referrer_then_campaign_is_a_new_visit() -> None:
    visits = group_visits(
        [hit(1, 0, urlref="https://search.test/"), hit(2, 10, url="https://a.test/?pk_cpn=x")]
    )
    assert ids(visits) == [[2], [1]]


@pytest.mark.parametrize("bad", ["http://[::1", "https://a.test]/?utm_campaign=x", "http://[zz]/"])
def test_urls_that_do_not_parse(bad: str) -> None:
    (visit,) = group_visits([hit(1, 0, url=bad, urlref=bad), hit(2, 5, url=bad, urlref=bad)])
    assert (visit.referrer_kind, visit.campaign) == ("direct", None)
