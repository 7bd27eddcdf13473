"""A matomo_url that cannot work is a ValueError at start-up that names the option."""

from __future__ import annotations

import pytest

from asgi_matomo import MatomoMiddleware
from asgi_matomo._types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # an IPv6 address without its closing bracket
        "https://matomo.example.org:99999",  # a port out of range
        "https://matomo.example.org:abc/",  # a port that is not a number
    ],
)
def test_a_url_that_does_not_parse_is_refused_at_start_up(url: str) -> None:
    with pytest.raises(ValueError, match=r"^matomo_url must be an http\(s\) URL"):
        MatomoMiddleware(app, matomo_url=url, idsite=1, visitor_ids=False)
