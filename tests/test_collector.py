"""The collector answers and stores like Matomo 5.1 (MATOMO.md), over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_matomo._collector import (
    BRUTE_FORCE_LIMIT,
    GIF,
    Collector,
    ReceivedRequest,
    StoredHit,
    serve,
)

TOKEN = "right-token-0123456789"
WRONG = "wrong-token"
OK = {"idsite": "1", "rec": "1", "send_image": "0"}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(token=TOKEN, sites=(1, 2)) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def track(client: httpx.Client, collector: Collector, **params: str) -> httpx.Response:
    return client.get(collector.tracking_url, params={**OK, **params})


def one_hit(client: httpx.Client, collector: Collector, **params: str) -> StoredHit:
    response = track(client, collector, **params)
    assert response.status_code == 204, response.text
    (hit,) = collector.wait_for_hits(1)
    return hit


def bulk(
    client: httpx.Client, collector: Collector, requests: list[Any], **top: Any
) -> httpx.Response:
    return client.post(collector.tracking_url, json={"requests": requests, **top})


# -- single hits: answers ---------------------------------------------------------


def test_single_hit_get_answers_gif_by_default(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.tracking_url, params={"idsite": "1", "rec": "1"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content == GIF
    assert len(collector.wait_for_hits(1)) == 1
    assert collector.requests == [ReceivedRequest("single", 200, 1, 0, 1, False)]


@pytest.mark.parametrize("path", ["/matomo.php", "/piwik.php"])
def test_single_hit_post_form_with_send_image_0(
    collector: Collector, client: httpx.Client, path: str
) -> None:
    response = client.post(collector.base_url + path, data={**OK, "url": "https://a.test/x"})
    assert response.status_code == 204
    assert response.content == b""
    assert collector.wait_for_hits(1)[0].url == "https://a.test/x"


def test_query_wins_over_form(collector: Collector, client: httpx.Client) -> None:
    response = client.post(
        collector.tracking_url,
        params={**OK, "url": "https://a.test/query"},
        data={"url": "https://a.test/form", "action_name": "from form"},
    )
    assert response.status_code == 204
    (hit,) = collector.wait_for_hits(1)
    assert (hit.url, hit.action_name) == ("https://a.test/query", "from form")


def test_no_parameters_get_answers_matomo_text(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.tracking_url)
    assert response.status_code == 200
    assert b"Matomo" in response.content
    assert collector.hits() == []


def test_no_parameters_post_is_bad_request(collector: Collector, client: httpx.Client) -> None:
    response = client.post(collector.tracking_url, content=b"")
    assert response.status_code == 400
    assert collector.requests[0].invalid == 1


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"idsite": "1", "send_image": "0"}, 204),
        ({"idsite": "2"}, 200),
        ({"rec": "0", "idsite": "1"}, 200),
        ({"rec": "abc", "idsite": "1", "cip": "1.2.3.4"}, 200),
    ],
)
def test_without_rec_success_and_nothing_stored(
    collector: Collector, client: httpx.Client, params: dict[str, str], status: int
) -> None:
    response = client.get(collector.tracking_url, params=params)
    assert response.status_code == status
    assert collector.requests[0].tracked == 0
    assert collector.hits() == []


def two_days_ago() -> str:
    return str(int(time.time()) - 2 * 86400)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"idsite": ""}, id="empty idsite"),
        pytest.param({"idsite": "99"}, id="unknown idsite"),
        pytest.param({"idsite": "one"}, id="non-numeric idsite"),
        pytest.param({"idsite": "-1"}, id="negative idsite"),
        pytest.param({"cip": "1.2.3.4"}, id="cip without token"),
        pytest.param({"cip": "1.2.3.4", "token_auth": WRONG}, id="cip with wrong token"),
        pytest.param({"cdt": "two-days"}, id="old cdt without token"),
        pytest.param({"cid": "abc"}, id="cid too short"),
        pytest.param({"cid": "0123456789abcdef0"}, id="cid too long"),
        pytest.param({"e_c": "cat"}, id="event without e_a"),
        pytest.param({"e_c": "cat", "e_a": "  "}, id="event with blank e_a"),
    ],
)
def test_invalid_single_hit_is_400_and_not_stored(
    collector: Collector, client: httpx.Client, params: dict[str, str]
) -> None:
    if params.get("cdt") == "two-days":
        params = {"cdt": two_days_ago()}
    response = track(client, collector, **params)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    # Matomo does not tell why without debug mode.
    assert b"error" in response.content
    assert collector.hits() == []
    assert collector.requests[0].invalid == 1


def test_missing_idsite_is_400(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.tracking_url, params={"rec": "1"})
    assert response.status_code == 400


def test_old_cdt_with_token_is_accepted(collector: Collector, client: httpx.Client) -> None:
    cdt = two_days_ago()
    hit = one_hit(client, collector, cdt=cdt, token_auth=TOKEN)
    assert hit.time == float(cdt)
    assert "token_auth" not in hit.params
    assert collector.requests[0].has_token


def test_bad_token_alone_is_ignored(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, token_auth=WRONG)
    assert hit.visitor_ip == "127.0.0.1"
    assert "token_auth" not in hit.params


def test_empty_event_category_is_a_page_view(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, e_c="", action_name="Home", pf_srv="12")
    assert (hit.hit_type, hit.action_name, hit.pf_srv) == ("pageview", "Home", 12)


# -- single hits: storage -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("201", 201),
        ("0", 0),
        ("16777215", 16777215),
        ("16777216", None),
        ("201.5", None),
        ("-1", None),
        ("abc", None),
        ("", None),
    ],
)
def test_pf_srv_rules(
    collector: Collector, client: httpx.Client, value: str, stored: int | None
) -> None:
    assert one_hit(client, collector, pf_srv=value).pf_srv == stored


def test_event_drops_action_name_and_pf_srv(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(
        client,
        collector,
        e_c="Cat",
        e_a="Act",
        e_n="Name",
        e_v="2.5",
        action_name="Title",
        pf_srv="201",
        url="https://a.test/",
    )
    assert hit.hit_type == "event"
    assert (hit.e_c, hit.e_a, hit.e_n, hit.e_v) == ("Cat", "Act", "Name", 2.5)
    assert hit.action_name is None
    assert hit.pf_srv is None
    assert hit.url == "https://a.test/"
    # The raw parameters still show what was sent.
    assert hit.params["action_name"] == "Title"


def test_event_value_must_be_numeric(collector: Collector, client: httpx.Client) -> None:
    assert one_hit(client, collector, e_c="C", e_a="A", e_v="lots").e_v is None


@pytest.mark.parametrize(
    ("cvar", "stored"),
    [
        ({"1": ["http_status_code", "200"]}, {"1": ["http_status_code", "200"]}),
        ({"1": ["a", "b"], "5": ["e", "f"]}, {"1": ["a", "b"], "5": ["e", "f"]}),
        ({"1": ["a", "b"], "6": ["x", "y"]}, {"1": ["a", "b"]}),
        ({"0": ["x", "y"]}, None),
        ({"http_status_code": 200}, None),
        ({"1": ["only name"]}, None),
        ({"1": ["a", "b", "c"]}, None),
        ({"1": "a=b"}, None),
        ({"1": [["a"], "b"]}, None),
        ({"1": [True, "b"]}, None),
        ({"1": ["n", 3]}, {"1": ["n", "3"]}),
        ({"01": ["a", "b"]}, {"1": ["a", "b"]}),
        ({"1x": ["a", "b"]}, None),
        ([["slot0", "x"], ["slot1", "y"]], {"1": ["slot1", "y"]}),
        ("just text", None),
        (200, None),
    ],
)
def test_cvar_shapes(
    collector: Collector, client: httpx.Client, cvar: object, stored: object
) -> None:
    assert one_hit(client, collector, cvar=json.dumps(cvar)).cvar == stored


@pytest.mark.parametrize("raw", ["", "{not json"])
def test_cvar_not_json_is_dropped(collector: Collector, client: httpx.Client, raw: str) -> None:
    assert one_hit(client, collector, cvar=raw).cvar is None


def test_cvar_values_are_truncated(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, cvar=json.dumps({"2": ["n", "v" * 300]}))
    assert hit.cvar == {"2": ["n", "v" * 200]}


def test_visit_scope_cvar(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, _cvar=json.dumps({"1": ["plan", "pro"]}))
    assert hit.cvar_visit == {"1": ["plan", "pro"]}
    assert hit.cvar is None


@pytest.mark.parametrize(
    ("cvar", "status"),
    [
        ({"1": ["http_status_code", "404"]}, 404),
        ({"3": ["HTTP Status Code", "500"]}, 500),
        ({"1": ["http_status", "201"]}, 201),
        ({"1": ["http_status_code", "n/a"]}, None),
        ({"1": ["other", "200"]}, None),
    ],
)
def test_http_status_from_cvar(
    collector: Collector, client: httpx.Client, cvar: object, status: int | None
) -> None:
    assert one_hit(client, collector, cvar=json.dumps(cvar)).http_status == status


def test_visitor_ip_is_the_peer_without_cip(collector: Collector, client: httpx.Client) -> None:
    assert one_hit(client, collector).visitor_ip == "127.0.0.1"


@pytest.mark.parametrize(
    ("cip", "stored"),
    [("203.0.113.9", "203.0.113.9"), ("2001:db8::1", "2001:db8::1"), ("nonsense", "0.0.0.0")],
)
def test_cip_with_token_is_the_visitor_ip(
    collector: Collector, client: httpx.Client, cip: str, stored: str
) -> None:
    assert one_hit(client, collector, cip=cip, token_auth=TOKEN).visitor_ip == stored


def test_ua_and_lang_default_to_the_senders_headers(
    collector: Collector, client: httpx.Client
) -> None:
    headers = {"User-Agent": "sender/1.0", "Accept-Language": "de"}
    assert client.get(collector.tracking_url, params=OK, headers=headers).status_code == 204
    (hit,) = collector.wait_for_hits(1)
    assert (hit.ua, hit.lang) == ("sender/1.0", "de")


def test_ua_and_lang_parameters_win(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, ua="Visitor/2.0", lang="fr-FR")
    assert (hit.ua, hit.lang) == ("Visitor/2.0", "fr-FR")


def test_url_and_action_name_truncated_to_1024(collector: Collector, client: httpx.Client) -> None:
    long_url = "https://a.test/" + "x" * 2000
    hit = one_hit(client, collector, url=long_url, action_name="t" * 1500, urlref=long_url)
    assert hit.url == long_url[:1024]
    assert hit.action_name == "t" * 1024
    assert hit.urlref == long_url[:1024]
    assert hit.params["url"] == long_url


@pytest.mark.parametrize(
    "cdt",
    ["unix", "unix-float", "datetime"],
)
def test_cdt_formats(collector: Collector, client: httpx.Client, cdt: str) -> None:
    stamp = int(time.time()) - 3600
    value = {
        "unix": str(stamp),
        "unix-float": f"{stamp}.0",
        "datetime": datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }[cdt]
    hit = one_hit(client, collector, cdt=value)
    assert hit.time == stamp
    assert hit.time_iso == datetime.fromtimestamp(stamp, tz=timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S"
    )
    assert hit.received > hit.time


@pytest.mark.parametrize(
    "cdt", ["tomorrow", "2020-13-45 99:00:00", str(int(time.time()) + 86400), "100"]
)
def test_unusable_cdt_is_ignored(collector: Collector, client: httpx.Client, cdt: str) -> None:
    # Matomo ignores an invalid, future or ancient cdt and uses the receive time.
    hit = one_hit(client, collector, cdt=cdt)
    assert hit.time == hit.received


def test_custom_dimensions(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(client, collector, dimension1="a", dimension07="b" * 300, dimension0="x")
    assert hit.dimensions == {"1": "a", "7": "b" * 250}


@pytest.mark.parametrize(
    ("params", "visitor_id"),
    [
        ({"_id": "0123456789abcdef"}, "0123456789abcdef"),
        ({"_id": "not-hex-at-all!!"}, None),
        ({"cid": "fedcba9876543210", "_id": "0123456789abcdef"}, "fedcba9876543210"),
        ({}, None),
    ],
)
def test_visitor_id(
    collector: Collector, client: httpx.Client, params: dict[str, str], visitor_id: str | None
) -> None:
    assert one_hit(client, collector, uid="user@a.test", **params).visitor_id == visitor_id


def test_uid_is_kept(collector: Collector, client: httpx.Client) -> None:
    assert one_hit(client, collector, uid="user@a.test").uid == "user@a.test"


@pytest.mark.parametrize(
    ("params", "hit_type", "url"),
    [
        ({"url": "https://a.test/"}, "pageview", "https://a.test/"),
        ({"download": "https://a.test/f.zip", "url": "https://a.test/"}, "download", None),
        ({"link": "https://b.test/", "url": "https://a.test/"}, "outlink", None),
        ({"ping": "1", "url": "https://a.test/"}, "ping", "https://a.test/"),
    ],
)
def test_hit_types(
    collector: Collector,
    client: httpx.Client,
    params: dict[str, str],
    hit_type: str,
    url: str | None,
) -> None:
    hit = one_hit(client, collector, **params)
    assert hit.hit_type == hit_type
    assert hit.url == (url or params.get("download") or params.get("link"))


def test_site_search(collector: Collector, client: httpx.Client) -> None:
    hit = one_hit(
        client, collector, search="shoes", search_cat="shop", search_count="4", action_name="S"
    )
    assert (hit.hit_type, hit.search, hit.search_cat, hit.search_count) == (
        "search",
        "shoes",
        "shop",
        4,
    )
    assert hit.action_name is None


def test_hits_are_oldest_first(collector: Collector, client: httpx.Client) -> None:
    for index in range(3):
        track(client, collector, url=f"https://a.test/{index}")
    urls = [hit.url for hit in collector.wait_for_hits(3)]
    assert urls == [f"https://a.test/{index}" for index in range(3)]


def test_chunked_body(collector: Collector, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"requests": ["?idsite=1&rec=1&url=one",'
        yield b' "?idsite=1&rec=1&url=two"]}'

    response = client.post(collector.tracking_url, content=chunks())
    assert response.json() == {"status": "success", "tracked": 2, "invalid": 0}


def test_token_never_logged(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_matomo")
    track(client, collector, token_auth=TOKEN, cip="bad ip", cid="short")
    bulk(client, collector, ["?idsite=9&rec=1"], token_auth=TOKEN)
    assert caplog.records
    assert TOKEN not in caplog.text


# -- bulk ---------------------------------------------------------------------------


def test_bulk_counts_tracked_and_invalid(collector: Collector, client: httpx.Client) -> None:
    response = bulk(
        client,
        collector,
        [
            "?idsite=1&rec=1&url=https%3A%2F%2Fa.test%2F1",
            "?idsite=99&rec=1",
            "?idsite=2&rec=1&url=https%3A%2F%2Fa.test%2F2",
            "?idsite=1&rec=1&cid=short",
            "?idsite=1&rec=1&cip=1.2.3.4",
            "?idsite=1&rec=1&e_c=c",
        ],
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    # No invalid_indices without the right token.
    assert response.json() == {"status": "success", "tracked": 2, "invalid": 4}
    assert [hit.idsite for hit in collector.hits()] == [1, 2]
    assert collector.requests == [ReceivedRequest("bulk", 200, 2, 4, 6, False)]


def test_bulk_with_token_reports_invalid_indices_and_authorizes_cip(
    collector: Collector, client: httpx.Client
) -> None:
    response = bulk(
        client,
        collector,
        [
            "?idsite=1&rec=1&cip=198.51.100.7",
            "?idsite=99&rec=1",
            f"?idsite=1&rec=1&cdt={two_days_ago()}",
        ],
        token_auth=TOKEN,
    )
    assert response.json() == {
        "status": "success",
        "tracked": 2,
        "invalid": 1,
        "invalid_indices": [1],
    }
    assert [hit.visitor_ip for hit in collector.hits()] == ["198.51.100.7", "127.0.0.1"]
    assert collector.requests[0].has_token


def test_bulk_element_token(collector: Collector, client: httpx.Client) -> None:
    response = bulk(
        client,
        collector,
        [f"?idsite=1&rec=1&cip=198.51.100.7&token_auth={TOKEN}", "?idsite=1&rec=1&cip=1.1.1.1"],
    )
    assert response.json() == {"status": "success", "tracked": 1, "invalid": 1}
    (hit,) = collector.hits()
    assert "token_auth" not in hit.params


@pytest.mark.parametrize(
    "body",
    [
        b'{"requests": ["?idsite=1&rec=1"',
        b'{"requests": "?idsite=1&rec=1"}',
        b'["requests", "?idsite=1&rec=1"]',
    ],
)
def test_bulk_malformed_json_tracks_nothing(
    collector: Collector, client: httpx.Client, body: bytes
) -> None:
    response = client.post(collector.tracking_url, content=body)
    assert response.status_code == 200
    assert response.json() == {"status": "success", "tracked": 0, "invalid": 0}
    assert collector.hits() == []


def test_bulk_skips_elements_that_are_not_hits(collector: Collector, client: httpx.Client) -> None:
    response = bulk(
        client,
        collector,
        [
            5,
            None,
            ["?idsite=1&rec=1"],
            "idsite=1&rec=1",
            "?",
            {},
            "?idsite=1&rec=1&url=kept",
        ],
        token_auth=TOKEN,
    )
    assert response.json() == {
        "status": "success",
        "tracked": 1,
        "invalid": 0,
        "invalid_indices": [],
    }
    assert [hit.url for hit in collector.hits()] == ["kept"]


def test_bulk_object_elements(collector: Collector, client: httpx.Client) -> None:
    element = {
        "idsite": 1,
        "rec": True,
        "url": "https://a.test/",
        "pf_srv": 12,
        "cvar": {"1": ["http_status_code", "200"]},
        "urlref": None,
    }
    response = bulk(client, collector, [element])
    assert response.json()["tracked"] == 1
    (hit,) = collector.hits()
    assert (hit.pf_srv, hit.http_status, hit.urlref) == (12, 200, None)
    assert hit.params["rec"] == "1"


def test_bulk_element_url_with_path_and_fragment(
    collector: Collector, client: httpx.Client
) -> None:
    bulk(client, collector, ["/matomo.php?idsite=1&rec=1&url=u#ignored"])
    assert collector.hits()[0].url == "u"


def test_bulk_element_without_rec_counts_as_tracked(
    collector: Collector, client: httpx.Client
) -> None:
    response = bulk(client, collector, ["?idsite=1&url=not-recorded"])
    assert response.json() == {"status": "success", "tracked": 1, "invalid": 0}
    assert collector.hits() == []


@pytest.mark.parametrize("send_image", [0, "0"])
def test_bulk_send_image_0_answers_204(
    collector: Collector, client: httpx.Client, send_image: object
) -> None:
    response = bulk(
        client, collector, ["?idsite=1&rec=1", "?idsite=99&rec=1"], send_image=send_image
    )
    assert response.status_code == 204
    assert response.content == b""
    assert len(collector.hits()) == 1


def test_bulk_is_detected_by_matomos_rule(collector: Collector, client: httpx.Client) -> None:
    # `"requests"` at position 0 is not a bulk request for Matomo's strpos() test.
    response = client.post(
        collector.tracking_url,
        params={"idsite": "1", "rec": "1"},
        content=b'"requests"',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.content == GIF
    assert collector.requests[0].kind == "single"


def test_bulk_single_quotes_count_as_bulk(collector: Collector, client: httpx.Client) -> None:
    response = client.post(collector.tracking_url, content=b"{'requests': []}")
    assert response.json() == {"status": "success", "tracked": 0, "invalid": 0}
    assert collector.requests[0].kind == "bulk"


# -- brute-force protection ---------------------------------------------------------


def block(collector: Collector, client: httpx.Client) -> None:
    for _ in range(BRUTE_FORCE_LIMIT):
        assert track(client, collector, token_auth=WRONG).status_code == 204


def test_brute_force_block(collector: Collector, client: httpx.Client) -> None:
    block(collector, client)
    assert len(collector.hits()) == BRUTE_FORCE_LIMIT
    assert track(client, collector, token_auth=TOKEN).status_code == 400
    response = bulk(client, collector, ["?idsite=1&rec=1"], token_auth=TOKEN)
    assert response.status_code == 500
    assert response.json()["status"] == "error"
    assert collector.requests[-1] == ReceivedRequest("bulk", 500, 0, 0, 1, True)
    # Requests without a token are not authenticated, hence not blocked.
    assert track(client, collector).status_code == 204
    assert bulk(client, collector, ["?idsite=1&rec=1"]).json()["tracked"] == 1
    # The reporting API is refused too.
    answer = client.post(
        collector.base_url + "/index.php",
        data={"module": "API", "method": "SitesManager.getSiteFromId", "token_auth": TOKEN},
    )
    assert answer.json()["result"] == "error"
    # A restart stands for the block expiring.
    collector.stop()
    collector.start()
    assert track(client, collector, token_auth=TOKEN, cip="1.2.3.4").status_code == 204


def test_wrong_bulk_tokens_count_as_failed_logins(
    collector: Collector, client: httpx.Client
) -> None:
    for _ in range(BRUTE_FORCE_LIMIT):
        bulk(client, collector, ["?idsite=1&rec=1"], token_auth=WRONG)
    assert bulk(client, collector, ["?idsite=1&rec=1"], token_auth=TOKEN).status_code == 500


def test_no_token_configured_never_authorizes(client: httpx.Client) -> None:
    with Collector() as tokenless:
        response = client.get(
            tokenless.tracking_url, params={**OK, "cip": "1.2.3.4", "token_auth": "anything"}
        )
        assert response.status_code == 400


# -- fault injection ----------------------------------------------------------------


def test_fault_status_for_count_requests(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(status=503, headers={"Retry-After": "7"}, count=2)
    for _ in range(2):
        response = bulk(client, collector, ["?idsite=1&rec=1"])
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
    assert collector.hits() == []
    assert bulk(client, collector, ["?idsite=1&rec=1"]).status_code == 200
    assert [r.faulted for r in collector.requests] == [True, True, False]
    assert collector.requests[0] == ReceivedRequest("bulk", 503, 0, 0, 1, False, faulted=True)


def test_fault_until_cleared_with_body(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(status=500, body=b'{"status":"error"}')
    for _ in range(3):
        response = track(client, collector)
        assert (response.status_code, response.content) == (500, b'{"status":"error"}')
        assert response.headers["content-type"] == "application/json"
    collector.clear_fault()
    assert track(client, collector).status_code == 204
    assert len(collector.hits()) == 1


def test_fault_content_type_header_wins(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(status=502, body=b"bad gateway", headers={"Content-Type": "text/plain"})
    response = track(client, collector)
    assert response.headers.get_list("content-type") == ["text/plain"]


def test_fault_204_has_no_body(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(status=204, count=1)
    assert track(client, collector).content == b""
    assert collector.hits() == []


def test_fault_delay_only_is_a_slow_matomo(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(delay=0.01, count=1)
    assert track(client, collector).status_code == 204
    assert len(collector.wait_for_hits(1)) == 1


def test_fault_delay_stores_nothing_when_the_client_gave_up(collector: Collector) -> None:
    collector.set_fault(delay=0.5, count=1)
    with httpx.Client(timeout=0.05) as impatient, pytest.raises(httpx.ReadTimeout):
        track(impatient, collector, token_auth=TOKEN)
    (request,) = collector.wait_for_requests(1)
    assert request == ReceivedRequest("single", 0, 0, 0, 1, True, faulted=True)
    assert collector.hits() == []


@pytest.mark.parametrize(
    ("body", "elements", "has_token"),
    [
        (b'{"requests": ["?idsite=1&rec=1", "?idsite=1&rec=1"]}', 2, False),
        (b'{"requests": ["?idsite=1&rec=1"], "token_auth": "x"}', 1, True),
        (b'{"requests": ["?idsite=1&rec=1&token_auth=x"]}', 1, True),
        (b'{"requests": "?idsite=1"}', 0, False),
        (b'{"requests": [', 0, False),
    ],
)
def test_faulted_requests_are_described(
    collector: Collector, client: httpx.Client, body: bytes, elements: int, has_token: bool
) -> None:
    collector.set_fault(status=500)
    assert client.post(collector.tracking_url, content=body).status_code == 500
    assert collector.requests == [
        ReceivedRequest("bulk", 500, 0, 0, elements, has_token, faulted=True)
    ]


def test_fault_drop_closes_without_answer(collector: Collector, client: httpx.Client) -> None:
    collector.set_fault(drop=True, count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        track(client, collector)
    assert collector.requests == [ReceivedRequest("single", 0, 0, 0, 1, False, faulted=True)]
    assert track(client, collector).status_code == 204


def test_fault_delay_does_not_block_other_requests_and_stop_interrupts_it(
    collector: Collector,
) -> None:
    collector.set_fault(delay=3600, count=1)
    errors: list[BaseException] = []

    def slow() -> None:
        with httpx.Client(timeout=60) as slow_client:
            try:
                track(slow_client, collector)
            except httpx.HTTPError as exc:
                errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    # Wait until the slow request has taken the fault.
    with collector._cond:
        assert collector._cond.wait_for(lambda: collector._fault is None, 10)
    with httpx.Client(timeout=10) as other:
        assert track(other, collector).status_code == 204
    collector.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert collector.requests[-1] == ReceivedRequest("single", 0, 0, 0, 1, False, faulted=True)
    assert len(collector.hits()) == 1


@pytest.mark.parametrize(("kwargs", "match"), [({"count": 0}, "count"), ({"delay": -1.0}, "delay")])
def test_set_fault_validates(collector: Collector, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collector.set_fault(**kwargs)


# -- lifecycle ----------------------------------------------------------------------


def test_restart_on_the_same_port_keeps_hits(collector: Collector) -> None:
    url = collector.tracking_url
    with httpx.Client(timeout=10) as keep_alive:
        assert track(keep_alive, collector).status_code == 204
        collector.stop()
        collector.stop()
        # The kept-alive connection must not be served after the "outage".
        with pytest.raises(httpx.TransportError):
            track(keep_alive, collector)
        collector.start()
        assert collector.tracking_url == url
        assert track(keep_alive, collector).status_code == 204
    assert len(collector.wait_for_hits(2)) == 2


def test_start_twice_is_an_error(collector: Collector) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        collector.start()


def test_base_url_needs_a_port() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = Collector().base_url
    assert Collector(host="::1", port=8765).tracking_url == "http://[::1]:8765/matomo.php"


@pytest.mark.parametrize("sites", [(0,), (True,), ("1",)])
def test_sites_are_validated(sites: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="sites"):
        Collector(sites=sites)


def test_db_file_keeps_hits_across_collectors(tmp_path: Path, client: httpx.Client) -> None:
    db = tmp_path / "hits.sqlite"
    with Collector(db_path=db) as first:
        assert track(client, first).status_code == 204
    with Collector(db_path=str(db)) as second:
        assert track(client, second).status_code == 204
        assert len(second.wait_for_hits(2)) == 2


def test_wait_for_hits_times_out_with_a_useful_message(
    collector: Collector, client: httpx.Client
) -> None:
    with pytest.raises(TimeoutError, match="got 0 from 0 tracking requests"):
        collector.wait_for_hits(1, timeout=0.01)
    track(client, collector, idsite="99")
    with pytest.raises(TimeoutError, match="single 400"):
        collector.wait_for_hits(1, timeout=0.01)


def test_wait_for_requests(collector: Collector, client: httpx.Client) -> None:
    with pytest.raises(TimeoutError, match="got 0"):
        collector.wait_for_requests(1, timeout=0.01)
    track(client, collector)
    assert len(collector.wait_for_requests(1)) == 1


def test_serve_stops_on_sigterm() -> None:
    seen: list[int] = []

    def ready(running: Collector) -> None:
        with httpx.Client(timeout=10) as http:
            seen.append(track(http, running).status_code)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    serve("127.0.0.1", 0, None, TOKEN, [1], ready=ready)
    assert seen == [204]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_serve_in_a_thread_stops_on_keyboard_interrupt() -> None:
    errors: list[BaseException] = []

    def ready(running: Collector) -> None:
        raise KeyboardInterrupt

    def run() -> None:
        try:
            serve(port=0, ready=ready)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert errors == []


# -- other endpoints ----------------------------------------------------------------


def test_unknown_path_is_404(collector: Collector, client: httpx.Client) -> None:
    assert client.get(collector.base_url + "/nope").status_code == 404
    assert client.post(collector.base_url + "/api/hits").status_code == 404


def test_body_too_large_is_413(collector: Collector) -> None:
    with socket.create_connection(("127.0.0.1", int(collector.base_url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /matomo.php HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        with s.makefile("rb") as reader:
            answer = reader.readline()
    assert answer.startswith(b"HTTP/1.1 413")


def test_bad_content_length_is_an_empty_body(collector: Collector) -> None:
    with socket.create_connection(("127.0.0.1", int(collector.base_url.rsplit(":", 1)[1]))) as s:
        s.sendall(
            b"POST /matomo.php HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n"
            b"Connection: close\r\n\r\n"
        )
        with s.makefile("rb") as reader:
            answer = reader.readline()
    assert answer.startswith(b"HTTP/1.1 400")


def test_chunked_body_too_large_is_413(
    collector: Collector, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._wire.MAX_BODY", 10)

    def chunks() -> Iterator[bytes]:
        yield b"0123456789"
        yield b"0123456789"

    assert client.post(collector.tracking_url, content=chunks()).status_code == 413


def api(client: httpx.Client, collector: Collector, **params: str) -> Any:
    response = client.get(collector.base_url + "/api/hits", params=params)
    assert response.status_code == 200
    return response.json()


def test_api_hits_filters(collector: Collector, client: httpx.Client) -> None:
    track(client, collector, url="https://a.test/shop/Shoes", action_name="Shoes")
    track(client, collector, url="https://a.test/blog", action_name="Blog about SHOES")
    track(client, collector, url="https://a.test/about", action_name="About")
    collector.wait_for_hits(3)
    everything = api(client, collector)
    assert [hit["id"] for hit in everything] == [3, 2, 1]
    assert everything[0]["time_iso"]
    assert [hit["id"] for hit in api(client, collector, limit="1")] == [3]
    assert [hit["id"] for hit in api(client, collector, q="shoes")] == [2, 1]
    assert [hit["id"] for hit in api(client, collector, q="100%")] == []
    assert [hit["id"] for hit in api(client, collector, since_id="1")] == [3, 2]
    assert [hit["id"] for hit in api(client, collector, limit="0")] == [3]
    bad = client.get(collector.base_url + "/api/hits", params={"limit": "ten"})
    assert bad.status_code == 400


def test_page_escapes_hits(collector: Collector, client: httpx.Client) -> None:
    evil = "<script>alert('x')</script>"
    track(
        client,
        collector,
        url="https://a.test/?q=<img src=x onerror=alert(1)>",
        action_name=evil,
        ua=evil,
        cvar=json.dumps({"1": ["http_status_code", "500"], "2": [evil, evil]}),
        dimension2=evil,
        pf_srv="42",
        **{evil: evil},
    )
    collector.wait_for_hits(1)
    for path in ("/", "/visits.html"):
        response = client.get(collector.base_url + path, params={"q": evil[:7]})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
        page = response.text
        assert "<script>alert" not in page
        assert "<img src=x" not in page
        assert "&lt;script&gt;" in page
        assert 'class="visit"' in page
        assert 'class="status status-error"' in page
        assert "42 ms" in page
    response = client.get(collector.base_url + "/")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert 'id="filter"' in page
    assert "/visits.html" in page
    # No external asset: everything is inline.
    assert "http://" not in page.replace("http://localhost", "")
    assert "https://" not in page.replace("https://a.test/", "")


def test_page_shows_visits_with_dimension_names(client: httpx.Client) -> None:
    with Collector(token=TOKEN, dimensions={3: "http_status_code"}) as collector:
        track(client, collector, url="https://a.test/one", dimension3="404", dimension5="x")
        track(client, collector, url="https://a.test/two", e_c="Video", e_a="Play", e_v="3")
        collector.wait_for_hits(2)
        page = client.get(collector.base_url + "/").text
    assert page.count('<article class="visit"') == 1
    assert "1 visit, 2 actions" in page
    assert (
        '<span class="name wrap">http_status_code</span> <span class="dim">dimension3</span>'
        in page
    )
    assert '<span class="name">dimension5</span>' in page
    assert '<span class="status status-error" title="HTTP status">404</span>' in page
    assert '<span class="wrap">Video / Play</span> <span class="label">value</span> 3' in page


def test_page_filter(collector: Collector, client: httpx.Client) -> None:
    track(client, collector, url="https://a.test/shoes", ua="A")
    track(client, collector, url="https://a.test/hats", ua="B")
    collector.wait_for_hits(2)
    page = client.get(collector.base_url + "/", params={"q": "SHOE"}).text
    assert page.count('<article class="visit"') == 1
    assert 'value="SHOE"' in page
    assert "https://a.test/shoes" in page
    assert "https://a.test/hats" not in page
    fragment = client.get(collector.base_url + "/visits.html", params={"q": "nothing"})
    assert fragment.headers["cache-control"] == "no-store"
    assert "No visit matches the filter." in fragment.text
    assert "<html" not in fragment.text


def test_visits_fragment_is_asked_again_only_when_hits_arrive(
    collector: Collector, client: httpx.Client
) -> None:
    page = client.get(collector.base_url + "/").text
    version = page.split('<main id="visits" data-version="', 1)[1].split('"', 1)[0]
    url = collector.base_url + "/visits.html"
    unchanged = client.get(url, headers={"If-None-Match": version.replace("&quot;", '"')})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert "content-length" not in unchanged.headers
    filtered = client.get(
        url, params={"q": "x"}, headers={"If-None-Match": unchanged.headers["etag"]}
    )
    assert filtered.status_code == 200
    track(client, collector, url="https://a.test/")
    collector.wait_for_hits(1)
    changed = client.get(url, headers={"If-None-Match": unchanged.headers["etag"]})
    assert changed.status_code == 200
    assert changed.headers["etag"] != unchanged.headers["etag"]
    assert "https://a.test/" in changed.text


def test_page_shows_the_latest_visits(
    collector: Collector, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._views.PAGE_VISITS", 2)
    for n in range(3):
        track(client, collector, url=f"https://a.test/{n}", new_visit="1")
    collector.wait_for_hits(3)
    page = client.get(collector.base_url + "/").text
    assert "3 visits, 3 actions, newest visit first (the 2 most recent shown)" in page
    assert page.count('<article class="visit"') == 2
    assert "https://a.test/0" not in page


def test_empty_page_says_where_to_send_hits(collector: Collector, client: httpx.Client) -> None:
    assert "send hits to <code>/matomo.php</code>" in client.get(collector.base_url + "/").text


def test_api_visits(collector: Collector, client: httpx.Client) -> None:
    cid = "0123456789abcdef"
    track(client, collector, url="https://a.test/1", cid=cid)
    track(client, collector, url="https://a.test/2", cid=cid)
    track(client, collector, url="https://a.test/3", cid="fedcba9876543210")
    collector.wait_for_hits(3)
    visits = client.get(collector.base_url + "/api/visits").json()
    assert [visit["visitor_id"] for visit in visits] == ["fedcba9876543210", cid]
    assert [hit["url"] for hit in visits[1]["actions"]] == ["https://a.test/1", "https://a.test/2"]
    assert visits[1]["ip_sent"] is False
    last = client.get(collector.base_url + "/api/visits", params={"last_hits": "1"}).json()
    assert [visit["visitor_id"] for visit in last] == ["fedcba9876543210"]
    assert [
        len(v["actions"])
        for v in client.get(collector.base_url + "/api/visits", params={"q": "a.test/2"}).json()
    ] == [2]
    bad = client.get(collector.base_url + "/api/visits", params={"last_hits": "all"})
    assert bad.status_code == 400
    assert client.post(collector.base_url + "/api/visits").status_code == 404


def test_page_reads_the_latest_hits_only(
    collector: Collector, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asgi_matomo._collector._views.PAGE_HITS", 2)
    for n in range(3):
        track(client, collector, url=f"https://a.test/{n}")
    collector.wait_for_hits(3)
    page = client.get(collector.base_url + "/").text
    assert "1 visit, 2 actions in the last 2 hits received, newest visit first" in page
    assert "https://a.test/0" not in page


@pytest.mark.parametrize(
    ("dimensions", "message"),
    [
        ({0: "zero"}, "ids are positive integers"),
        ({True: "bool"}, "ids are positive integers"),
        ({"3": "text"}, "ids are positive integers"),
        ({3: " "}, "a name for dimension 3"),
        ({3: 3}, "a name for dimension 3"),
    ],
)
def test_dimension_names_are_checked(dimensions: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Collector(dimensions=dimensions)


# -- the reporting API stand-in -----------------------------------------------------


def reporting(client: httpx.Client, collector: Collector, **form: str) -> Any:
    data = {"module": "API", "format": "json", **form}
    response = client.post(collector.base_url + "/index.php", data=data)
    assert response.status_code == 200
    return response.json()


def test_get_site_from_id(collector: Collector, client: httpx.Client) -> None:
    site = reporting(
        client, collector, method="SitesManager.getSiteFromId", idSite="2", token_auth=TOKEN
    )
    assert site["idsite"] == 2


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"idSite": "3", "token_auth": TOKEN}, "unexpected website"),
        ({"idSite": "x", "token_auth": TOKEN}, "unexpected website"),
        ({"idSite": "1", "token_auth": WRONG}, "Unable to authenticate"),
        ({"idSite": "1"}, "requires 'view' access"),
        ({"token_auth": TOKEN}, "idSite"),
    ],
)
def test_get_site_from_id_errors(
    collector: Collector, client: httpx.Client, form: dict[str, str], message: str
) -> None:
    answer = reporting(client, collector, method="SitesManager.getSiteFromId", **form)
    assert answer["result"] == "error"
    assert message in answer["message"]


@pytest.mark.parametrize(("token", "sites"), [(TOKEN, [1, 2]), (WRONG, [])])
def test_sites_with_admin_access(
    collector: Collector, client: httpx.Client, token: str, sites: list[int]
) -> None:
    answer = reporting(
        client, collector, method="SitesManager.getSitesIdWithAdminAccess", token_auth=token
    )
    assert answer == sites


def test_unknown_api_method(collector: Collector, client: httpx.Client) -> None:
    answer = reporting(client, collector, method="Live.getLastVisitsDetails", token_auth=TOKEN)
    assert answer["message"] == (
        "The method 'getLastVisitsDetails' does not exist or is not available in the module 'Live'."
    )


def test_index_php_without_api_module(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.base_url + "/index.php")
    assert response.status_code == 200
    assert b"Matomo" in response.content


def test_a_stopped_collector_keeps_its_port_from_other_servers() -> None:
    # A test stops the collector (Matomo down) and starts an app on "a free port":
    # the app must never be given the collector's port, or the sender would post
    # to the app itself.
    with Collector() as collector:
        port = httpx.URL(collector.base_url).port
        assert port is not None
        collector.stop()
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))
        with pytest.raises(httpx.ConnectError):
            httpx.get(collector.tracking_url, timeout=5)
        collector.start()
        assert httpx.get(collector.base_url + "/api/hits", timeout=5).status_code == 200
