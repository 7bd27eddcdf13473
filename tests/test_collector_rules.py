"""Matomo's rules for one hit, applied directly without a server (MATOMO.md)."""

from __future__ import annotations

import json

import pytest

from asgi_matomo._collector._rules import (
    InvalidHitError,
    bulk_element,
    hit_row,
    is_bulk,
    is_recording,
    site_id,
)

NOW = 1_750_000_000.0


def row(params: dict[str, str], *, authorized: bool = False) -> dict[str, object]:
    return hit_row(
        params,
        idsite=1,
        token="t" if authorized else None,
        authorized=authorized,
        token_fix="give the tracker the token",
        peer="192.0.2.1",
        user_agent="agent/1",
        accept_language="en",
        now=NOW,
    )


@pytest.mark.parametrize(
    ("params", "sites", "kind"),
    [
        ({}, None, "idsite"),
        ({"idsite": "0"}, None, "idsite"),
        ({"idsite": "x"}, None, "idsite"),
        ({"idsite": "3"}, frozenset({1, 2}), "idsite"),
    ],
)
def test_site_id_refusals(params: dict[str, str], sites: frozenset[int] | None, kind: str) -> None:
    with pytest.raises(InvalidHitError) as caught:
        site_id(params, sites)
    assert caught.value.kind == kind


def test_site_id_accepts_a_served_site() -> None:
    assert site_id({"idsite": " 2 "}, frozenset({1, 2})) == 2
    assert site_id({"idsite": "7"}, None) == 7


@pytest.mark.parametrize(
    ("value", "stored"),
    [("201", 201), ("201.5", None), ("-1", None), ("16777216", None), ("16777215", 16777215)],
)
def test_pf_srv_kept_only_when_matomo_keeps_it(value: str, stored: int | None) -> None:
    assert row({"idsite": "1", "rec": "1", "pf_srv": value})["pf_srv"] == stored


def test_cvar_keeps_valid_slots_and_reads_the_http_status() -> None:
    cvar = json.dumps({"1": ["HTTP status code", "404"], "6": ["x", "y"], "2": "bad"})
    stored = row({"idsite": "1", "rec": "1", "cvar": cvar})
    assert stored["cvar"] == json.dumps({"1": ["HTTP status code", "404"]})
    assert stored["http_status"] == 404


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"cid": "short"}, "cid"),
        ({"cip": "198.51.100.7"}, "cip"),
        ({"e_c": "Foo"}, "event"),
        ({"cdt": str(NOW - 2 * 86400)}, "cdt"),
    ],
)
def test_hit_refusals(params: dict[str, str], kind: str) -> None:
    with pytest.raises(InvalidHitError) as caught:
        row({"idsite": "1", "rec": "1", **params})
    assert caught.value.kind == kind


def test_the_token_allows_cip_and_old_cdt() -> None:
    stamp = NOW - 2 * 86400
    stored = row(
        {"idsite": "1", "rec": "1", "cip": "198.51.100.7", "cdt": str(stamp)}, authorized=True
    )
    assert stored["visitor_ip"] == "198.51.100.7"
    assert stored["time"] == stamp


def test_an_event_keeps_no_page_title_and_headers_fill_in() -> None:
    stored = row({"idsite": "1", "rec": "1", "e_c": "C", "e_a": "A", "action_name": "Title"})
    assert stored["hit_type"] == "event"
    assert stored["action_name"] is None
    assert (stored["ua"], stored["lang"], stored["visitor_ip"]) == ("agent/1", "en", "192.0.2.1")


@pytest.mark.parametrize(
    ("rec", "recording"), [("1", True), ("2", True), ("0", False), ("", False)]
)
def test_is_recording(rec: str, recording: bool) -> None:
    assert is_recording({"rec": rec}) is recording


def test_bulk_detection_and_elements() -> None:
    assert is_bulk(b'{"requests": []}')
    assert not is_bulk(b'"requests"')  # at offset 0: PHP's strpos() is falsy
    assert bulk_element("?idsite=1&rec=1#x") == {"idsite": "1", "rec": "1"}
    assert bulk_element({"idsite": 1, "rec": True}) == {"idsite": "1", "rec": "1"}
    assert bulk_element(42) is None
    assert bulk_element("no-query") is None
