"""Test helpers: record what your app sends to Matomo and assert on it.

This module is public. It needs nothing beyond the library's own dependencies.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from urllib.parse import parse_qsl

import anyio
import httpx

__all__ = ["MatomoRecorder", "RecordedRequest"]

# How often wait_for() looks at the recorded hits.
POLL_INTERVAL = 0.01


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request that reached the recorder, decoded.

    Parameters:
        method: `POST` for the middleware's bulk requests.
        url: the address it was sent to (without any query).
        hits: the Matomo parameters of each hit it carried, decoded.
        had_token: whether it carried a `token_auth` (the token itself is not kept).
        bulk: whether it used Matomo's bulk format (a JSON `requests` list).
    """

    method: str
    url: str
    hits: list[dict[str, str]]
    had_token: bool
    bulk: bool


class MatomoRecorder:
    """A fake Matomo for your tests: pass `recorder.client` as the middleware's `client`.

    It answers like Matomo's bulk tracking API (every hit tracked) and keeps the
    decoded parameters of each hit, `cdt` and `cip` included, `token_auth` never.
    No network is involved: the client uses `httpx.MockTransport`.

    ```python
    recorder = MatomoRecorder()
    app.add_middleware(
        MatomoMiddleware, matomo_url="https://matomo.test", idsite=1, client=recorder.client
    )
    ...  # make requests to the app
    hits = await recorder.wait_for(1)
    assert hits[0]["action_name"] == "/"
    ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._client: httpx.AsyncClient | None = None
        self.transport = httpx.MockTransport(self._handle)
        """The transport behind `client`, for a client of your own making."""

    @property
    def client(self) -> httpx.AsyncClient:
        """The `httpx.AsyncClient` to give the middleware (always the same one)."""
        if self._client is None:
            self._client = httpx.AsyncClient(transport=self.transport)
        return self._client

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def hits(self) -> list[dict[str, str]]:
        """The parameters of every hit received so far, oldest first."""
        with self._lock:
            return [dict(hit) for request in self._requests for hit in request.hits]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._requests.clear()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
        """Wait until at least `count` hits arrived and return all of them.

        With a background sender (the app's lifespan runs), hits arrive after
        the `flush_interval`; raises `TimeoutError` when `timeout` seconds pass first.
        """
        with anyio.move_on_after(timeout):
            while True:
                hits = self.hits
                if len(hits) >= count:
                    return hits
                await anyio.sleep(POLL_INTERVAL)
        raise TimeoutError(
            f"expected at least {count} Matomo hits within {timeout:g}s, got"
            f" {len(self.hits)}: does the app run its lifespan, and is flush_interval"
            " shorter than the timeout?"
        )

    async def aclose(self) -> None:
        """Close the client (it holds no connection: optional)."""
        if self._client is not None:
            await self._client.aclose()

    def _handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        url = str(request.url.copy_with(query=None))
        data = _json(body) if request.method == "POST" else None
        if isinstance(data, dict) and isinstance(data.get("requests"), list):
            had_token = bool(data.get("token_auth"))
            hits = []
            for element in data["requests"]:
                params = _element(element)
                had_token |= bool(params.pop("token_auth", ""))
                hits.append(params)
            self._record(RecordedRequest(request.method, url, hits, had_token, bulk=True))
            answer = {"status": "success", "tracked": len(hits), "invalid": 0}
            return httpx.Response(200, json=answer)
        # A single hit: GET query, or a form POST (the query wins, as in PHP).
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        params.update(parse_qsl(request.url.query.decode(), keep_blank_values=True))
        had_token = bool(params.pop("token_auth", ""))
        self._record(RecordedRequest(request.method, url, [params], had_token, bulk=False))
        return httpx.Response(204)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _element(element: object) -> dict[str, str]:
    """One bulk element's parameters: a query string (`?a=1&b=2`) or a JSON object."""
    if isinstance(element, dict):
        return {str(key): _text(value) for key, value in element.items()}
    if isinstance(element, str):
        return dict(parse_qsl(element.partition("?")[2], keep_blank_values=True))
    return {}


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
