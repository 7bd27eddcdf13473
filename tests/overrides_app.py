"""A raw ASGI app whose handler writes awkward override values, served by a real uvicorn.

`GET /<case>` writes `CASES[case]` to the request's override dict, as a handler
would. tests/test_overrides.py checks what the local Matomo stores for each.
"""

from __future__ import annotations

from typing import Any

from asgi_matomo import MatomoMiddleware
from asgi_matomo._types import Receive, Scope, Send


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


CASES: dict[str, dict[str, Any]] = {
    "bytes": {"uid": b"user-7", "action_name": b"caf\xc3\xa9", "cvar": {b"plan": b"pro"}},
    "unprintable": {"uid": Unprintable(), "action_name": "kept"},
    "cdt-float": {"cdt": 1e300, "action_name": "kept"},
    "cdt-int": {"cdt": 10**400, "action_name": "kept"},
    "cdt-nan": {"cdt": float("nan"), "action_name": "kept"},
    "cdt-ms": {"cdt": "1700000000000", "action_name": "kept"},
    "surrogates": {"action_name": "a\ud800b", "uid": "\udcff"},
    "long": {"action_name": "x" * 5000, "uid": "u" * 500, "dimension1": "d" * 900},
    "bad-cid": {"cid": "not a visitor id", "action_name": "kept"},
    "many-cvars": {"cvar": {f"v{i}": i for i in range(1000)}},
    "big-int": {"uid": 10**5000, "action_name": "kept"},
    # PHP would read ` idsite` as `idsite`; `a&b=c` would add a parameter `b`.
    "bad-names": {" idsite": 9, "a&b=c": "x", "url\n": "/evil", "dimension2": "kept"},
}


async def handler(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # the middleware answers the lifespan
    case = scope["path"].strip("/")
    scope["state"]["asgi_matomo"] = dict(CASES.get(case, {}))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": case.encode()})


# The server tests point it at the local stand-in (tests/apps.py).
app = MatomoMiddleware(handler, matomo_url="https://matomo.example.org", idsite=1)
