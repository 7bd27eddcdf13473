"""What `pip install` of the project pulls: never PyPI's unrelated `asgi-matomo` 0.8.0."""

from __future__ import annotations

import re
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from asgi_matomo._demo import REQUIREMENTS
from tests.servers import ROOT

PROJECT = canonicalize_name("asgi-matomo")


def requirements() -> list[Requirement]:
    return [Requirement(line) for line in requires("asgi-matomo") or []]


def extra_of(requirement: Requirement) -> str | None:
    match = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(requirement.marker or ""))
    return None if match is None else match.group(1)


def test_no_dependency_or_extra_names_the_project_itself() -> None:
    # A self-reference (e.g. `asgi-matomo[collector]` inside an extra) could be
    # resolved from PyPI, where that name is an older, different library.
    found = requirements()
    assert found
    assert [str(r) for r in found if canonicalize_name(r.name) == PROJECT] == []


def test_runtime_dependencies_are_httpx_and_anyio() -> None:
    runtime = {canonicalize_name(r.name) for r in requirements() if extra_of(r) is None}
    assert runtime == {"httpx", "anyio"}


def test_demo_extra_has_what_the_demo_needs_and_no_toolchain() -> None:
    demo = {canonicalize_name(r.name) for r in requirements() if extra_of(r) == "demo"}
    assert demo >= set(REQUIREMENTS)
    assert not demo & {"mypy", "ruff", "pytest", "mkdocs-material", "django", "litestar"}
    dev = {canonicalize_name(r.name) for r in requirements() if extra_of(r) == "dev"}
    # `make test` keeps the whole toolchain, the demo's needs included.
    assert dev >= demo | {"mypy", "ruff", "pytest"}


def test_make_demo_installs_the_demo_extra_with_its_own_stamp() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: \$\(DEMO_STAMP\)$", makefile, re.MULTILINE)
    assert "-e '.[demo]'" in makefile
    assert "-e '.[dev]'" in makefile
    assert re.search(r"^pytest: \$\(STAMP\)$", makefile, re.MULTILINE)
