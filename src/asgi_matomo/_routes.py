"""The matched route's template, and the `route_details` it selects.

Read from the scope by duck typing: no framework is imported. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from asgi_matomo._encoding import CACHE_SIZE
from asgi_matomo._request import RequestInfo, TrackingConfig
from asgi_matomo._types import Scope

# Whether a route class declares sub-routes (Starlette's Mount: a property), asked
# once per class: hasattr() on a missing attribute raises and catches inside.
_mount_types: dict[type, bool] = {}


def _is_mount(route: object) -> bool:
    kind = type(route)
    declared = _mount_types.get(kind)
    if declared is None:
        declared = hasattr(kind, "routes")
        if len(_mount_types) < CACHE_SIZE:
            _mount_types[kind] = declared
    if declared:
        return True
    # Or set on the object itself.
    attributes = getattr(route, "__dict__", None)
    return attributes is not None and "routes" in attributes


def route_template(scope: Scope) -> str | None:
    """The matched route's template (`/users/{id}`) where the framework exposes it.

    Read by duck typing, so that no framework is imported at runtime:

    - Starlette and FastAPI leave the innermost matched route in `scope["route"]`
      and the mount prefixes in `root_path`. A `Mount` itself is not a template.
    - Litestar writes the matched template to `scope["path_template"]`.
    - Django and Quart put nothing in the scope; `asgi_matomo.contrib` stores
      `request.resolver_match` (Django) or the template string itself (Quart's
      `request.url_rule.rule`) in `scope["route"]`. Django's routes are relative
      (`users/<int:pk>/`) and its regex routes (`^...`) are no template to show.

    Templates are relative to the app, so `root_path` is put in front.
    """
    route = scope.get("route")
    path: object = None
    if isinstance(route, str):
        path = route
    elif route is not None and not _is_mount(route):
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        if path is None:
            # Django's ResolverMatch: `route` is the matched pattern without the slash.
            django_route = getattr(route, "route", None)
            if isinstance(django_route, str) and not django_route.startswith("^"):
                path = "/" + django_route.removeprefix("/")
    if path is None:
        path = scope.get("path_template")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    root = scope.get("root_path")
    return (root if isinstance(root, str) else "") + path


# `{id:int}` and `{id}` name the same parameter: frameworks show templates with or
# without their converters (Starlette's `path` vs `path_format`, Litestar, Quart).
_CONVERTER = re.compile(r"\{([^{}:]+):[^{}]*\}")


def template_key(template: str) -> str:
    """A route template without parameter converters, for matching `route_details`."""
    return _CONVERTER.sub(r"{\1}", template) if ":" in template else template


def lookup_route_details(
    config: TrackingConfig, info: RequestInfo, template: str | None
) -> Mapping[str, Any] | None:
    """Route details by template first, then by path (with and without root_path)."""
    details = config.route_details
    if not details:
        return None
    below_root = None
    if template is not None and info.path != info.app_path:
        # Templates can be written with or without the mount/root prefix too.
        prefix = info.path[: len(info.path) - len(info.app_path)]
        below_root = template[len(prefix) :] if template.startswith(prefix) else None
    if template is not None:
        template = template_key(template)
        below_root = template_key(below_root) if below_root is not None else None
    for key in (template, below_root, info.path, info.app_path):
        if key is not None and key in details:
            return details[key]
    return None
