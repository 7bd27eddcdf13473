"""The stand-in answers probes, refusals and QueuedTracking like Matomo 5.1.2 (MATOMO.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from asgi_matomo._collector import GIF, Collector, ReceivedRequest, _server

TOKEN = "probe-token-0123456789"
WRONG = "wrong-token"


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(token=TOKEN, sites=(1, 2)) as running:
        yield running


@pytest.fixture
def queued() -> Iterator[Collector]:
    with Collector(token=TOKEN, sites=(1, 2), queued_tracking=True) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "asgi_matomo" and record.levelno == logging.WARNING
    ]


# -- probes that record nothing (MATOMO.md, verified on Matomo 5.1.2, plain) ---------


@pytest.mark.parametrize(
    ("query", "status", "content_type"),
    [
        pytest.param("idsite=1&send_image=0", 204, None, id="site without rec"),
        pytest.param("idsite=999&send_image=0", 400, "text/html", id="unknown site"),
        pytest.param("send_image=0", 400, "text/html", id="no idsite"),
        pytest.param("idsite=abc&send_image=0", 400, "text/html", id="non-numeric idsite"),
        pytest.param("idsite=0&send_image=0", 400, "text/html", id="idsite 0"),
        pytest.param("idsite=" + "9" * 5000, 400, "text/html", id="idsite of 5000 digits"),
        pytest.param("", 200, "text/html", id="no query"),
        pytest.param("idsite=1", 200, "image/gif", id="site without send_image"),
    ],
)
def test_probes_answer_like_matomo(
    collector: Collector, client: httpx.Client, query: str, status: int, content_type: str | None
) -> None:
    response = client.get(f"{collector.tracking_url}?{query}" if query else collector.tracking_url)
    assert response.status_code == status
    if content_type is None:
        assert response.content == b""
        assert "content-type" not in response.headers
    else:
        assert response.headers["content-type"].startswith(content_type)
    if content_type == "image/gif":
        assert response.content == GIF
    if query == "":
        assert b"endpoint for the Matomo tracking API" in response.content
    # Plain Matomo keeps the connection open.
    assert response.headers.get("connection") != "close"
    assert collector.hits() == []


@pytest.mark.parametrize(
    ("element", "tracked", "invalid"),
    [
        ("?idsite=1&send_image=0", 1, 0),
        ("?idsite=999&send_image=0", 0, 1),
        ("?send_image=0", 0, 1),
    ],
)
def test_bulk_probe_counts_like_matomo(
    collector: Collector, client: httpx.Client, element: str, tracked: int, invalid: int
) -> None:
    response = client.post(collector.tracking_url, json={"requests": [element]})
    assert response.status_code == 200
    assert response.json() == {"status": "success", "tracked": tracked, "invalid": invalid}
    assert collector.hits() == []


# -- every site by default -------------------------------------------------------------


def test_every_site_is_served_by_default(client: httpx.Client) -> None:
    with Collector() as collector:
        response = client.get(
            collector.tracking_url,
            params={"idsite": "12345", "rec": "1", "url": "https://a.test/docs"},
        )
        assert response.status_code == 200
        (hit,) = collector.wait_for_hits(1)
        shown = client.get(collector.base_url + "/api/hits").json()
    assert (hit.idsite, hit.url) == (12345, "https://a.test/docs")
    assert [item["idsite"] for item in shown] == [12345]


def test_reporting_api_with_every_site(client: httpx.Client) -> None:
    with Collector(token=TOKEN) as collector:
        url = collector.base_url + "/index.php"
        form = {"module": "API", "format": "json", "token_auth": TOKEN}
        site = client.post(
            url, data={**form, "method": "SitesManager.getSiteFromId", "idSite": "77"}
        )
        admin = client.post(url, data={**form, "method": "SitesManager.getSitesIdWithAdminAccess"})
        unknown = client.post(
            url, data={**form, "method": "SitesManager.getSiteFromId", "idSite": "0"}
        )
    assert site.json()["idsite"] == 77
    # Every site exists: the list can only name the sites heard of so far.
    assert admin.json() == [77]
    assert "unexpected website" in unknown.json()["message"]


def test_sites_heard_of_are_bounded(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_server, "MAX_SEEN_SITES", 2)
    with Collector(token=TOKEN) as collector:
        for site in (5, 6, 7):
            client.get(collector.tracking_url, params={"idsite": str(site), "rec": "1"})
        admin = client.post(
            collector.base_url + "/index.php",
            data={
                "module": "API",
                "method": "SitesManager.getSitesIdWithAdminAccess",
                "token_auth": TOKEN,
            },
        )
        assert len(collector.wait_for_hits(3)) == 3
    assert admin.json() == [5, 6]


def test_a_long_list_of_sites_is_shortened(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    with Collector(sites=range(1, 31)) as collector:
        client.get(collector.tracking_url, params={"idsite": "99", "rec": "1"})
    (said,) = warnings_of(caplog)
    assert "(sites: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)" in said


# -- refusals said on the console ---------------------------------------------------


@pytest.mark.parametrize(
    ("params", "said"),
    [
        pytest.param({"idsite": "7"}, ["idsite 7 is not served", "drop --sites", "add 7"]),
        pytest.param({}, ["without idsite", "idsite=1"], id="no idsite"),
        pytest.param({"idsite": "x7"}, ["idsite 'x7' is not a site id"], id="not a number"),
        pytest.param({"idsite": "1", "cip": "1.2.3.4"}, ["cip with no token_auth", "--token"]),
        pytest.param(
            {"idsite": "1", "cip": "1.2.3.4", "token_auth": WRONG},
            ["cip with a wrong token_auth", "--token"],
        ),
        pytest.param({"idsite": "1", "cid": "abc"}, ["cid 'abc' is not 16 characters"]),
        pytest.param({"idsite": "1", "e_c": "Shop"}, ["e_c='Shop'", "without e_a"]),
        pytest.param({"idsite": "1", "cdt": "two days ago"}, ["older than 24 hours"]),
    ],
)
def test_refused_hit_is_said_at_warning_with_the_fix(
    collector: Collector,
    client: httpx.Client,
    caplog: pytest.LogCaptureFixture,
    params: dict[str, str],
    said: list[str],
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    if params.get("cdt") == "two days ago":
        params = {**params, "cdt": str(int(time.time()) - 2 * 86400)}
    response = client.get(collector.tracking_url, params={"rec": "1", **params})
    assert response.status_code == 400
    refusal = [line for line in warnings_of(caplog) if "refused a hit (400)" in line]
    assert len(refusal) == 1, warnings_of(caplog)
    for words in said:
        assert words in refusal[0]
    assert WRONG not in caplog.text
    assert TOKEN not in caplog.text


def test_refusals_are_rate_limited(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    for site in ("7", "3", "7"):
        for _ in range(10):
            client.get(collector.tracking_url, params={"idsite": site, "rec": "1"})
    client.get(collector.tracking_url, params={"rec": "1"})
    client.get(collector.tracking_url, params={"idsite": "1", "rec": "1", "cip": "1.2.3.4"})
    client.get(collector.tracking_url, params={"idsite": "1", "rec": "1", "cip": "1.2.3.4"})
    assert len(collector.requests) == 33
    # One line per reason within the interval, however many hits: a second
    # site, a missing site and a cip without token each have theirs.
    said = warnings_of(caplog)
    assert len(said) == 4, said
    assert "idsite 7 is not served" in said[0]
    assert "idsite 3 is not served" in said[1]
    assert "a hit without idsite" in said[2]
    assert "cip with no token_auth" in said[3]


def test_bulk_refusals_are_said(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    response = client.post(
        collector.tracking_url, json={"requests": ["?idsite=1&rec=1", 5, "?idsite=9&rec=1"]}
    )
    client.post(collector.tracking_url, content=b'{"requests": ')
    assert response.json() == {"status": "success", "tracked": 1, "invalid": 1}
    said = "\n".join(warnings_of(caplog))
    assert "skipped bulk element 1" in said
    assert "counted bulk element 2 invalid: idsite 9 is not served" in said
    assert 'not JSON with a "requests" list' in said


def test_wrong_token_and_block_are_said(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    params = {"idsite": "1", "rec": "1", "token_auth": WRONG}
    client.get(collector.tracking_url, params=params)
    said = warnings_of(caplog)
    assert any("wrong token_auth" in line and "failed login 1 of 20" in line for line in said)
    assert WRONG not in caplog.text


def test_post_without_parameters_is_said(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    assert client.post(collector.tracking_url, content=b"").status_code == 400
    assert any("POST without any parameter" in line for line in warnings_of(caplog))


def test_accepted_hits_say_nothing(
    collector: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    client.get(collector.tracking_url, params={"idsite": "1", "rec": "1", "token_auth": TOKEN})
    client.post(collector.tracking_url, json={"requests": ["?idsite=2&rec=1"]})
    assert len(collector.wait_for_hits(2)) == 2
    assert warnings_of(caplog) == []


# -- with QueuedTracking in front (MATOMO.md, Matomo 5.1.2 + QueuedTracking 5.1.1) ------


def assert_queued_answer(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    assert response.headers["connection"] == "close"
    if status == 204:
        assert response.content == b""
    else:
        assert response.headers["content-type"] == "image/gif"
        assert response.content == GIF


def test_queued_good_bulk_is_a_gif_without_counts(queued: Collector, client: httpx.Client) -> None:
    response = client.post(
        queued.tracking_url, json={"requests": ["?idsite=1&rec=1&url=a", "?idsite=2&rec=1&url=b"]}
    )
    assert_queued_answer(response, 200)
    assert len(GIF) == 43
    assert [hit.url for hit in queued.wait_for_hits(2)] == ["a", "b"]
    assert queued.requests == [ReceivedRequest("bulk", 200, 2, 0, 2, False)]


def test_queued_unknown_site_is_dropped_later_in_silence(
    queued: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    response = client.post(
        queued.tracking_url, json={"requests": ["?idsite=999&rec=1", "?idsite=1&rec=1&url=kept"]}
    )
    assert_queued_answer(response, 200)
    assert [hit.url for hit in queued.hits()] == ["kept"]
    assert queued.requests[0].invalid == 1
    # The sender never hears of it; the stand-in's console does.
    assert any(
        "dropped a queued hit" in line and "idsite 999" in line for line in warnings_of(caplog)
    )


@pytest.mark.parametrize("token", [None, WRONG])
def test_queued_cip_without_the_right_token_refuses_the_whole_bulk(
    queued: Collector, client: httpx.Client, caplog: pytest.LogCaptureFixture, token: str | None
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_matomo")
    body: dict[str, Any] = {"requests": ["?idsite=1&rec=1", "?idsite=1&rec=1&cip=1.2.3.4"]}
    if token is not None:
        body["token_auth"] = token
    response = client.post(queued.tracking_url, json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "image/gif"
    assert response.headers["connection"] == "close"
    assert queued.hits() == []
    assert any("nothing queued" in line for line in warnings_of(caplog))


def test_queued_cip_with_the_token_is_stored(queued: Collector, client: httpx.Client) -> None:
    response = client.post(
        queued.tracking_url,
        json={"requests": ["?idsite=1&rec=1&cip=1.2.3.4"], "token_auth": TOKEN},
    )
    assert_queued_answer(response, 200)
    assert queued.wait_for_hits(1)[0].visitor_ip == "1.2.3.4"


@pytest.mark.parametrize(
    ("query", "status"),
    [("idsite=1&send_image=0", 204), ("idsite=999&send_image=0", 204), ("idsite=1", 200)],
)
def test_queued_single_probes(
    queued: Collector, client: httpx.Client, query: str, status: int
) -> None:
    response = client.get(f"{queued.tracking_url}?{query}")
    assert_queued_answer(response, status)


def test_queued_single_hit_and_its_refusals(queued: Collector, client: httpx.Client) -> None:
    ok = client.get(queued.tracking_url, params={"idsite": "1", "rec": "1", "send_image": "0"})
    bad = client.get(queued.tracking_url, params={"idsite": "9", "rec": "1", "send_image": "0"})
    cip = client.get(queued.tracking_url, params={"idsite": "1", "rec": "1", "cip": "1.2.3.4"})
    assert_queued_answer(ok, 204)
    assert_queued_answer(bad, 204)
    assert cip.status_code == 400
    assert len(queued.hits()) == 1


def test_queued_bulk_send_image_0_and_malformed_body(
    queued: Collector, client: httpx.Client
) -> None:
    empty = client.post(
        queued.tracking_url, json={"requests": ["?idsite=1&rec=1"], "send_image": 0}
    )
    malformed = client.post(queued.tracking_url, content=b'{"requests": 3}')
    assert_queued_answer(empty, 204)
    assert_queued_answer(malformed, 200)
    assert len(queued.hits()) == 1


def test_queuedtracking_0_bypasses_the_queue(queued: Collector, client: httpx.Client) -> None:
    url = queued.tracking_url + "?queuedtracking=0"
    response = client.post(url, json={"requests": ["?idsite=1&rec=1", "?idsite=9&rec=1"]})
    single = client.get(queued.tracking_url, params={"idsite": "9", "queuedtracking": "0"})
    assert response.json() == {"status": "success", "tracked": 1, "invalid": 1}
    assert single.status_code == 400


def test_queued_blocked_peer_is_refused(queued: Collector, client: httpx.Client) -> None:
    for _ in range(20):
        client.get(queued.tracking_url, params={"idsite": "1", "token_auth": WRONG})
    response = client.post(
        queued.tracking_url, json={"requests": ["?idsite=1&rec=1"], "token_auth": TOKEN}
    )
    assert response.status_code == 400
    assert queued.hits() == []
