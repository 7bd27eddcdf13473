"""Browser and OS names for the collector's page, with and without ua-parser."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from asgi_matomo._collector import _useragent
from asgi_matomo._collector._useragent import MAX_PARSED_LENGTH, Software, _describe, describe

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    _describe.cache_clear()
    yield
    _describe.cache_clear()


@pytest.mark.parametrize(
    ("user_agent", "software"),
    [
        (IPHONE, Software("Mobile Safari 17.4", "iOS 17.4", "iPhone")),
        (FIREFOX, Software("Firefox 128.0", "Linux", None)),
        ("python-httpx/0.27.0", Software(None, None, None)),
    ],
)
def test_describe(user_agent: str, software: Software) -> None:
    assert describe(user_agent) == software


def test_without_ua_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    # The optional extra not installed: the import fails and the page shows raw text.
    monkeypatch.setitem(sys.modules, "ua_parser", None)
    _useragent._parser.cache_clear()
    try:
        assert describe(FIREFOX) is None
    finally:
        _useragent._parser.cache_clear()


def test_long_text_is_cut_before_parsing() -> None:
    padded = FIREFOX.ljust(MAX_PARSED_LENGTH)
    assert describe(padded + "a" * 5000) == Software("Firefox 128.0", "Linux", None)
    assert describe(padded + "b" * 9000) == Software("Firefox 128.0", "Linux", None)
    # Both were parsed as their first MAX_PARSED_LENGTH characters: one entry.
    assert _describe.cache_info().currsize == 1
