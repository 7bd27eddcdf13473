"""Each framework's documented example, served by a real uvicorn, received by the local Matomo.

The examples under docs_src/frameworks/ are what docs/frameworks.md shows. They
all serve the same little site, so one table of expectations covers them: the
route template each framework reports, route_details, per-request overrides
from the handler, PerfMsTracker, a POST answered 201, and an unmatched path.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from asgi_matomo._collector import Collector, StoredHit
from tests.servers import serve

pytestmark = pytest.mark.slow

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) asgi-matomo-framework-tests"
_ids = itertools.count(1)


@dataclass(frozen=True)
class Framework:
    app: str
    # The template the framework reports for /users/7 (action_name_from_route=True).
    user_template: str
    # More (method, path, status, action name) checks than the common ones.
    extra: tuple[tuple[str, str, int, str], ...] = field(default=())


FRAMEWORKS = {
    "starlette": Framework("docs_src.frameworks.starlette_app:app", "/users/{user_id}"),
    "fastapi": Framework(
        "docs_src.frameworks.fastapi_app:app",
        "/users/{user_id}",
        extra=(("GET", "/shop/items/3", 200, "/shop/items/{item_id}"),),
    ),
    "litestar": Framework("docs_src.frameworks.litestar_app:app", "/users/{user_id}"),
    "quart": Framework("docs_src.frameworks.quart_app:app", "/users/<int:user_id>"),
    "django": Framework("docs_src.frameworks.django_app:application", "/users/<int:user_id>"),
    "raw-asgi": Framework("docs_src.frameworks.raw_asgi:app", "/users/{user_id}"),
}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(sites=[12345]) as running:
        yield running


def request(client: httpx.Client, method: str, path: str) -> tuple[str, httpx.Response]:
    """Send one request tagged with a unique id; returns the id and the response."""
    rid = f"r{next(_ids)}"
    response = client.request(method, path, params={"rid": rid})
    return rid, response


def by_rid(hits: list[StoredHit]) -> dict[str, list[StoredHit]]:
    found: dict[str, list[StoredHit]] = {}
    for hit in hits:
        assert hit.url is not None
        rid = httpx.URL(hit.url).params.get("rid", "")
        found.setdefault(rid, []).append(hit)
    return found


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_framework_example(name: str, collector: Collector, tmp_path: Path) -> None:
    check_example(FRAMEWORKS[name], "uvicorn", collector, tmp_path)


@pytest.mark.parametrize("kind", ["hypercorn-asyncio", "granian"])
@pytest.mark.parametrize("name", ["starlette", "django", "quart"])
def test_framework_example_on_other_servers(
    name: str, kind: str, collector: Collector, tmp_path: Path
) -> None:
    """Servers differ in what they put in the scope (`state`, `root_path`, extensions).

    Not on trio: the examples wait with asyncio.sleep, and Django is asyncio-only
    (tests/test_servers.py runs an anyio app on hypercorn's trio worker).
    """
    check_example(FRAMEWORKS[name], kind, collector, tmp_path)


def check_example(framework: Framework, kind: str, collector: Collector, tmp_path: Path) -> None:
    """Serve the example, send every request of the common site, check every hit."""
    checks = [
        ("GET", "/", 200, "/"),
        ("GET", "/users/7", 200, framework.user_template),
        ("GET", "/about", 200, "About us"),
        ("GET", "/report", 200, "Monthly report"),
        ("POST", "/items", 201, "/items"),
        ("GET", "/missing/page", 404, "(not found)"),
        *framework.extra,
    ]
    sent: dict[str, tuple[str, str, int, str]] = {}
    options = {"action_name_from_route": True}
    with serve(
        framework.app, collector.tracking_url, tmp_path, kind=kind, options=options
    ) as server:
        headers = {"user-agent": USER_AGENT}
        with httpx.Client(base_url=server.url, headers=headers) as client:
            for method, path, status, action_name in checks:
                rid, response = request(client, method, path)
                assert response.status_code == status, (method, path, response.text)
                sent[rid] = (method, path, status, action_name)
        host = server.url.removeprefix("http://")
    # The server has stopped and flushed: nothing more, nothing twice.
    hits = by_rid(collector.hits())
    assert sorted(hits) == sorted(sent)
    for rid, (method, path, status, action_name) in sent.items():
        (hit,) = hits[rid]
        assert hit.idsite == 12345
        assert hit.hit_type == "pageview"
        assert hit.url == f"https://{host}{path}?rid={rid}"
        assert hit.action_name == action_name, path
        assert hit.http_status == status
        assert hit.ua == USER_AGENT
        assert hit.cvar is not None
        assert hit.cvar["1"] == ["http_status_code", str(status)]
        assert hit.cvar["2"] == ["http_method", method]
        assert hit.pf_srv is not None
        if path == "/report":
            # Set by the handler: the override and PerfMsTracker's timing of a 50 ms
            # wait. uvloop's timers count whole milliseconds from a clock read at the
            # start of each loop turn, so a 50 ms sleep may end a little early.
            assert hit.cvar["3"] == ["plan", "pro"]
            assert hit.pf_srv >= 48
        else:
            assert "3" not in hit.cvar


def test_litestar_define_middleware_tracks_matched_routes_only(
    collector: Collector, tmp_path: Path
) -> None:
    """Litestar applies app-level middleware per route, after routing (documented)."""
    app = "docs_src.frameworks.litestar_define:app"
    options = {"action_name_from_route": True}
    with serve(app, collector.tracking_url, tmp_path, options=options) as server:
        with httpx.Client(base_url=server.url) as client:
            _, missing = request(client, "GET", "/missing")
            assert missing.status_code == 404
            rid, response = request(client, "GET", "/users/5")
            assert response.text == "user 5"
        # No lifespan reaches the middleware: the hit is sent right after the response.
        (hit,) = collector.wait_for_hits(1)
    assert hit.action_name == "/users/{user_id}"
    assert hit.http_status == 200
    assert list(by_rid(collector.hits())) == [rid]


def test_docs_page_includes_every_example() -> None:
    """docs/frameworks.md includes each example file, so the page shows what is tested."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "frameworks.md").read_text()
    included = sorted(re.findall(r'^--8<-- "(docs_src/frameworks/[^"]+)"$', page, re.MULTILINE))
    examples = sorted(
        path.relative_to(root).as_posix()
        for path in (root / "docs_src" / "frameworks").glob("*.py")
        if path.name != "__init__.py"
    )
    assert included == examples


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn-asyncio"])
def test_fastapi_below_a_path_prefix(kind: str, collector: Collector, tmp_path: Path) -> None:
    """Served under /api by a proxy that strips the prefix (`--root-path /api`).

    uvicorn puts the prefix into `path`, hypercorn does not: either way it appears
    once in the URL and in the route template.
    """
    app = FRAMEWORKS["fastapi"].app
    checks = {"/users/7": (200, "/api/users/{user_id}"), "/missing": (404, "(not found)")}
    if kind == "uvicorn":
        # Not under hypercorn: there Starlette's Mount misses (404) below a root_path,
        # because hypercorn leaves the prefix out of `path`. Not the middleware's doing.
        checks["/shop/items/3"] = (200, "/api/shop/items/{item_id}")
    options = {"action_name_from_route": True}
    extra = ("--root-path", "/api")
    with (
        serve(app, collector.tracking_url, tmp_path, kind=kind, options=options, extra=extra) as (
            server
        ),
        httpx.Client(base_url=server.url) as client,
    ):
        for path, (status, _) in checks.items():
            assert client.get(path, params={"rid": "1"}).status_code == status, path
    host = server.url.removeprefix("http://")
    hits = {hit.url: hit.action_name for hit in collector.hits()}
    assert hits == {f"https://{host}/api{path}?rid=1": name for path, (_, name) in checks.items()}
