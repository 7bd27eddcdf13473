"""The documentation's examples, served by a real uvicorn, received by the local Matomo.

Each example file under docs_src/ is exactly what the docs page shows; the test
only points its placeholder `matomo_url` at the collector.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from tests.servers import serve

pytestmark = pytest.mark.slow

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) asgi-matomo-tests"
HEADERS = {
    "user-agent": USER_AGENT,
    "accept-language": "sv-SE,sv;q=0.9",
    "referer": "https://ref.example/",
}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(sites=[1, 12345]) as running:
        yield running


def get(url: str) -> httpx.Response:
    with httpx.Client(headers=HEADERS) as client:
        return client.get(url)


def common_checks(hit: StoredHit, base_url: str, path: str, idsite: int = 12345) -> None:
    host = base_url.removeprefix("http://")
    assert hit.idsite == idsite
    assert hit.url == f"https://{host}{path}"
    assert hit.ua == USER_AGENT
    assert hit.lang == "sv-SE,sv;q=0.9"
    assert hit.params["apiv"] == "1"
    assert hit.params["rec"] == "1"
    assert "gt_ms" not in hit.params
    assert "cip" not in hit.params  # no access_token in the examples


def test_route_details_example(collector: Collector, tmp_path: Path) -> None:
    with serve("docs_src.details.tutorial001:app", collector.tracking_url, tmp_path) as server:
        response = get(server.url + "/foo?x=1")
        assert response.json() == {"name": "foo"}
        page, event = collector.wait_for_hits(2)
    common_checks(page, server.url, "/foo?x=1")
    assert page.hit_type == "pageview"
    assert page.action_name == "Foo/foo"
    assert page.urlref == "https://ref.example/"
    assert page.cvar == {"1": ["http_status_code", "200"], "2": ["http_method", "GET"]}
    assert isinstance(page.pf_srv, int)
    assert event.hit_type == "event"
    assert (event.e_c, event.e_a) == ("Foo", "Playing")
    assert event.params["ca"] == "1"
    assert event.url == page.url


def test_request_state_example(collector: Collector, tmp_path: Path) -> None:
    with serve("docs_src.details.tutorial002:app", collector.tracking_url, tmp_path) as server:
        assert get(server.url + "/foo").json() == {"name": "foo"}
        page, event = collector.wait_for_hits(2)
    common_checks(page, server.url, "/foo")
    assert page.action_name == "Foo/foo"
    assert page.cvar == {
        "1": ["http_status_code", "200"],
        "2": ["http_method", "GET"],
        "3": ["anything", "goes"],
    }
    assert (event.e_c, event.e_a) == ("Foo", "Playing")
    assert json.loads(page.params["cvar"]) == page.cvar


def test_perf_ms_tracker_example(collector: Collector, tmp_path: Path) -> None:
    with serve("docs_src.details.tutorial003:app", collector.tracking_url, tmp_path) as server:
        assert get(server.url + "/").json() == {"data": 4000}
        (page,) = collector.wait_for_hits(1)
    common_checks(page, server.url, "/")
    assert page.action_name == "/"
    # The tracker timed `await asyncio.sleep(0.2)`: whole milliseconds, at least 200.
    assert page.params["pf_srv"].isdigit()
    assert page.pf_srv is not None
    assert page.pf_srv >= 200


def test_placeholder_url_is_a_clear_error_at_startup() -> None:
    from asgi_matomo import MatomoMiddleware

    with pytest.raises(ValueError, match="matomo_url must be an http"):
        MatomoMiddleware(lambda s, r, w: None, matomo_url="YOUR MATOMO TRACKING URL", idsite=1)  # type: ignore[arg-type,return-value]


def test_readme_starlette_example(collector: Collector, tmp_path: Path) -> None:
    with serve("docs_src.usage.starlette_app:app", collector.tracking_url, tmp_path) as server:
        assert get(server.url + "/").json() == {"hello": "world"}
        assert get(server.url + "/health").status_code == 404  # excluded: not tracked
        assert get(server.url + "/?after=1").status_code == 200
        hits = collector.wait_for_hits(2)
    common_checks(hits[0], server.url, "/", idsite=1)
    assert [hit.url.rsplit("/", 1)[1] for hit in hits if hit.url] == ["", "?after=1"]


def test_readme_fastapi_example(collector: Collector, tmp_path: Path) -> None:
    app = "docs_src.usage.fastapi_app:app"
    with serve(app, collector.tracking_url, tmp_path) as server:
        assert get(server.url + "/items/42").json() == {"item_id": 42}
        (hit,) = collector.wait_for_hits(1)
    common_checks(hit, server.url, "/items/42", idsite=1)
    assert hit.action_name == "/items/{item_id}"
    assert hit.http_status == 200
