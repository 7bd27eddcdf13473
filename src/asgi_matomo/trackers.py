"""Helpers that measure parts of a request and hand the numbers to the middleware.

This module is public: the documented API imports `PerfMsTracker` from it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any, cast

__all__ = ["PerfMsTracker"]

STATE_KEY = "asgi_matomo"


class PerfMsTracker:
    """Time a block of code and report it to Matomo in integer milliseconds.

    Usable as a sync or async context manager. The elapsed time is written to
    `scope["state"]["asgi_matomo"][key]`, which the middleware reads when the
    response ends; it works (and does nothing else) without the middleware.

        async def homepage(request):
            with PerfMsTracker(scope=request.scope, key="pf_srv"):
                data = await fetch_data()
            return JSONResponse(data)

    Parameters:
        scope: the ASGI scope of the current request (`request.scope`).
        key: the Matomo parameter to set, e.g. `"pf_srv"`.
    """

    __slots__ = ("_key", "_scope", "_start")

    def __init__(self, *, scope: Mapping[str, Any], key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"PerfMsTracker key must be a non-empty string, got {key!r}")
        # Any framework's scope type is welcome (TypedDicts are Mappings to mypy);
        # at run time every ASGI scope is a mutable dict.
        self._scope = cast("MutableMapping[str, Any]", scope)
        self._key = key
        self._start = 0.0

    def __enter__(self) -> PerfMsTracker:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Matomo stores performance values only as whole milliseconds: a decimal
        # `pf_srv` is answered with success and silently dropped (MATOMO.md).
        elapsed_ms = round((time.perf_counter() - self._start) * 1000)
        _tracking_state(self._scope)[self._key] = elapsed_ms

    async def __aenter__(self) -> PerfMsTracker:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _tracking_state(scope: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The per-request override dict, created on first use."""
    state = scope.get("state")
    if not isinstance(state, MutableMapping):
        state = {}
        scope["state"] = state
    overrides = state.get(STATE_KEY)
    if not isinstance(overrides, MutableMapping):
        overrides = {}
        state[STATE_KEY] = overrides
    return overrides
