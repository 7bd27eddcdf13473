"""The ASGI type aliases, kept local so that Starlette is not a runtime dependency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# What the middleware accepts as the wrapped app: frameworks type their scopes as
# TypedDicts (Litestar, Quart/Hypercorn) or not at all (Django), and all of them
# are valid ASGI apps. Calls go through `ASGIApp`.
AnyASGIApp = Callable[..., Awaitable[None]]
