"""Django route templates for `action_name_from_route=True`.

Django resolves the URL inside its own handler and keeps the match on the
request (`request.resolver_match`). `MatomoRouteMiddleware`, added to the
`MIDDLEWARE` setting, hands it to the middleware through the ASGI scope; the
middleware reads its pattern (`users/<int:user_id>` becomes
`/users/<int:user_id>`). Regex patterns (`re_path`) are no template: the path
is used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

__all__ = ["MatomoRouteMiddleware"]

SyncGetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


class MatomoRouteMiddleware:
    """Hand Django's matched URL pattern to asgi-matomo.

    Example:
        ```python
        MIDDLEWARE = [
            "asgi_matomo.contrib.django.MatomoRouteMiddleware",
            # ... the project's other middleware
        ]
        ```

    Works in Django's sync and async modes alike, without a thread switch: the
    pattern is stored once the response is made, which is before it is sent and
    before the middleware reads it. Under WSGI (no ASGI scope) it does nothing.

    Args:
        get_response: The rest of Django's handler chain (Django passes it).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: SyncGetResponse | AsyncGetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            # Django then awaits this middleware instead of running it in a thread.
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        response = cast(SyncGetResponse, self.get_response)(request)
        _store_route(request)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await cast(AsyncGetResponse, self.get_response)(request)
        _store_route(request)
        return response


def _store_route(request: HttpRequest) -> None:
    scope = getattr(request, "scope", None)
    match = getattr(request, "resolver_match", None)
    if isinstance(scope, dict) and match is not None:
        scope["route"] = match
