"""Quart route templates for `action_name_from_route=True`.

Quart keeps the matched rule on the request (`request.url_rule`), not in the
ASGI scope. `add_route_templates(app)` registers a `before_request` hook that
hands the rule's template (`/users/<int:user_id>`) to the middleware. It runs
first: a hook that answers early (a maintenance page, a refused login) stops
the hooks after it, and its page view would lose its template.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, TypeVar, cast

from quart import Quart, request

__all__ = ["add_route_templates"]

AppT = TypeVar("AppT", bound=Quart)


def add_route_templates(app: AppT) -> AppT:
    """Name page views after Quart's route templates, for every route of `app`.

    Example:
        ```python
        app = Quart(__name__)
        add_route_templates(app)
        app.asgi_app = MatomoMiddleware(app.asgi_app, ..., action_name_from_route=True)
        ```

    Args:
        app: The Quart application; returned, so that the call can wrap its creation.
    """
    hooks = app.before_request_funcs[None]
    if _store_route in hooks:
        hooks.remove(_store_route)
    # App-wide hooks run before the blueprints' ones, in order: first of all.
    hooks.insert(0, _store_route)
    return app


async def _store_route() -> None:
    # An async hook: Quart would run a plain function in a thread.
    rule = request.url_rule
    if rule is not None:
        cast(MutableMapping[str, Any], request.scope)["route"] = rule.rule
