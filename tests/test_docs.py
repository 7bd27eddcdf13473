"""The documentation site: its examples run, its includes exist, and it builds."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from asgi_matomo._collector import Collector
from tests.servers import ROOT

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient and warns once, on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    import docs_src.testing.app as testing_app
    from docs_src.testing import test_mock, test_recorder
    from starlette.testclient import TestClient

DOCS = ROOT / "docs"
# Pages written by other developers keep their examples inline and test them
# in their own test modules.
INLINE_EXAMPLES = {"deployment.md", "frameworks.md"}
SNIPPET = re.compile(r'^-{1,3}8<-{1,3} "([^"]+)"', re.MULTILINE)
# ```python, ```py title="x", or ``` { .python title="x" } (which `ruff format`,
# formatting Python blocks in Markdown, leaves alone: it would break the includes).
FENCE = re.compile(r"^```\s*(?:\{\s*\.)?(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- the examples of "Testing your app" ------------------------------------------------


def test_recorder_example_without_lifespan() -> None:
    test_recorder.test_homepage_is_tracked()


def test_recorder_example_with_lifespan() -> None:
    test_recorder.test_health_checks_are_not_tracked()


@pytest.mark.anyio
async def test_recorder_example_async() -> None:
    await test_recorder.test_homepage_is_tracked_async()


def test_mock_example() -> None:
    test_mock.test_homepage_is_tracked_with_a_mock()


def test_testing_app_in_production_makes_its_own_client() -> None:
    (middleware,) = testing_app.app.user_middleware
    assert middleware.kwargs["client"] is None


# -- the example of "Local development" -------------------------------------------------


def test_local_app_sends_to_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    with Collector(token="local-token") as collector:
        monkeypatch.setenv("MATOMO_URL", collector.base_url)
        monkeypatch.setenv("MATOMO_TOKEN", "local-token")
        import docs_src.demo.local_app as local_app

        app = importlib.reload(local_app).app
        assert TestClient(app).get("/").json() == {"hello": "world"}
        (hit,) = collector.wait_for_hits(1)
    assert hit.url == "http://testserver/"
    assert hit.params["cip"] == "testclient"


def test_local_app_defaults_to_the_collector_address(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MATOMO_URL", "MATOMO_IDSITE", "MATOMO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import docs_src.demo.local_app as local_app

    middleware = importlib.reload(local_app).app.user_middleware[0]
    assert middleware.kwargs["matomo_url"] == "http://127.0.0.1:8765"
    assert middleware.kwargs["idsite"] == 1


# -- the pages ---------------------------------------------------------------------------


def my_pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if p.name not in INLINE_EXAMPLES)


def test_every_python_example_is_an_included_file() -> None:
    """Python on the pages comes from files under docs_src/, never typed into the page."""
    pages = my_pages()
    assert pages
    for page in pages:
        for language, body in FENCE.findall(page.read_text()):
            if language not in ("python", "py"):
                continue
            lines = [line for line in body.splitlines() if line.strip()]
            assert lines, f"{page.name}: an empty python block"
            for line in lines:
                match = SNIPPET.match(line)
                assert match, f"{page.name}: python typed into the page: {line!r}"
                assert match.group(1).startswith("docs_src/"), line


def test_every_included_file_exists_and_is_tested() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for page in my_pages():
        for include in SNIPPET.findall(page.read_text()):
            path = include.split(":", 1)[0]
            assert (ROOT / path).is_file(), f"{page.name} includes a missing {path}"
            if path.startswith("docs_src/") and path.endswith(".py"):
                module = path.removesuffix(".py").replace("/", ".")
                package, _, name = module.rpartition(".")
                imported = rf"^\s*from {re.escape(package)} import [^\n]*\b{name}\b"
                assert module in tests or re.search(imported, tests, re.MULTILINE), (
                    f"{page.name} shows {path}, which no test runs"
                )


def test_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f" {page.name}" in config, f"{page.name} is not in mkdocs.yml's nav"


def test_benchmark_results_are_included_without_their_relative_links() -> None:
    """The page shows bench/RESULTS.md by line ranges that skip its links and plot."""
    page = (DOCS / "benchmarks.md").read_text()
    match = re.search(r'^--8<-- "bench/RESULTS\.md:([0-9:,]+)"', page, re.MULTILINE)
    if not (ROOT / "bench" / "RESULTS.md").exists():
        assert match is None
        return
    assert match, "benchmarks.md should include bench/RESULTS.md"
    lines = (ROOT / "bench" / "RESULTS.md").read_text().splitlines()
    shown: list[str] = []
    for part in match.group(1).split(","):
        start, _, end = part.partition(":")
        shown += lines[int(start) - 1 : int(end) if end else None]
    advice = "bench/RESULTS.md changed: update the line ranges in docs/benchmarks.md"
    assert shown[0].startswith("## "), advice
    # Links are relative to bench/, where the site cannot follow them.
    assert not [line for line in shown if re.search(r"\]\((?!https?:)", line)], advice


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (dev extra)"
)
def test_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reference = (tmp_path / "reference" / "index.html").read_text()
    for name in ("MatomoMiddleware", "PerfMsTracker", "MatomoRecorder", "wait_for"):
        assert name in reference
    details = (tmp_path / "details" / "index.html").read_text()
    # The tested file, not a copy: its placeholder URL shows up verbatim.
    assert "YOUR MATOMO TRACKING URL" in details


def test_the_benchmarks_page_plot_is_the_committed_one() -> None:
    """docs/img/throughput.png is a copy of the last run's plot under bench/."""
    page = (ROOT / "docs" / "img" / "throughput.png").read_bytes()
    assert page == (ROOT / "bench" / "throughput.png").read_bytes()
