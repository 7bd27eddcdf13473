"""What `pip install` of the project pulls: never PyPI's unrelated `asgi-matomo` 0.8.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import requires
from pathlib import Path

import pytest
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


def test_runtime_dependencies_are_httpx_anyio_and_h11() -> None:
    # All three come with httpx anyway; anyio and h11 are named because the library
    # imports them itself.
    runtime = {canonicalize_name(r.name) for r in requirements() if extra_of(r) is None}
    assert runtime == {"httpx", "anyio", "h11"}


def test_demo_extra_has_what_the_demo_needs_and_no_toolchain() -> None:
    demo = {canonicalize_name(r.name) for r in requirements() if extra_of(r) == "demo"}
    assert demo >= set(REQUIREMENTS)
    assert not demo & {"mypy", "ruff", "pytest", "mkdocs-material", "django", "litestar"}
    dev = {canonicalize_name(r.name) for r in requirements() if extra_of(r) == "dev"}
    # `make test` keeps the whole toolchain, the demo's needs included.
    assert dev >= demo | {"mypy", "ruff", "pytest"}


def make_dry_run(directory: Path, target: str) -> list[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=directory,
        capture_output=True,
        text=True,
        check=True,
    )
    # One line per shell command: continuation lines joined.
    return result.stdout.replace("\\\n", " ").splitlines()


def installs(lines: list[str]) -> list[str]:
    # The project's own installs (not pip upgrading itself).
    return [line for line in lines if "pip install" in line and " -e " in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_and_make_test_each_install_their_own_extra(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    # A fresh clone: the demo installs the demo extra only.
    (demo_install,) = installs(make_dry_run(tmp_path, "demo"))
    assert "-e '.[demo]'" in demo_install
    assert "[dev]" not in demo_install
    # After `make demo`, `make test` still installs the whole toolchain...
    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / ".demo-installed").touch()
    assert installs(make_dry_run(tmp_path, "demo")) == []
    (test_install,) = installs(make_dry_run(tmp_path, "pytest"))
    assert "-e '.[dev]'" in test_install
    # ... and once it has, neither installs anything again.
    (venv / ".installed").touch()
    assert installs(make_dry_run(tmp_path, "pytest")) == []
    assert make_dry_run(tmp_path, "demo") == [".venv/bin/asgi-matomo demo"]
