"""The per-request dict of Matomo parameters, and the way to reach it from anywhere.

Every HTTP request gets a fresh `scope["state"]["asgi_matomo"]` dict, tracked or
not: a handler cannot know whether its request is excluded, and must be able to
write to it either way. The request's state is also held in a context variable,
so that code deep in the call stack can set parameters without the scope
(`set_tracking_params`). A sync endpoint run in a thread pool gets a copy of the
context, which refers to the same state: its writes reach the request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from asgi_matomo._overrides import shown, warn_once
from asgi_matomo._types import Scope

# Where the request's own Matomo parameters live: `scope["state"][STATE_KEY]`.
STATE_KEY = "asgi_matomo"
# Set in the request's state once its hits are built: what set_tracking_params
# would write later (a task the handler started, still running) reaches no hit.
# The dot keeps it clear of the names apps give their state attributes.
HIT_BUILT_KEY = "asgi_matomo.hit_built"

# The state (not the dict under STATE_KEY): a handler may replace that dict, and
# what is written later must land in the one the middleware reads.
logger = logging.getLogger("asgi_matomo")
# A wrong argument is a bug at one call site, repeated on every request: said once.
_misuse_said = False

current_state: ContextVar[MutableMapping[str, Any] | None] = ContextVar(
    "asgi_matomo_state", default=None
)


def set_tracking_params(params: Mapping[str, Any] | None = None, /, **more: Any) -> bool:
    """Set Matomo parameters of the current request, from anywhere in its code.

    Works like `dict.update` on `request.scope["state"]["asgi_matomo"]`, except
    that custom variables (`cvar`) are added to those already set. Outside a
    request (a background job, a test without the middleware) it does nothing
    and returns False; so it does, with a warning, once the request's hit was
    built (in a task the handler started that is still running when the
    response has ended).

    ```python
    from asgi_matomo import set_tracking_params


    def load_account(user_id: str) -> Account:
        set_tracking_params(uid=user_id, dimension3="beta")
        ...
    ```

    Args:
        params: parameters as a dict (`{"uid": "u-42"}`), and/or
        **more: as keyword arguments (`uid="u-42"`).

    Returns:
        True when the parameters were set for a request, in time for its hit.
    """
    state = current_state.get()
    if state is None:
        return False
    if state.get(HIT_BUILT_KEY):
        _said_too_late(params, more)
        return False
    given: object = params  # whatever the hints say, callers pass lists and strings too
    if given is not None and not isinstance(given, Mapping):
        # Never an exception in the app's code: the keyword arguments still count.
        _said_misuse(type(given).__name__)
        params = None
    overrides = state.get(STATE_KEY)
    if not isinstance(overrides, MutableMapping):
        overrides = state[STATE_KEY] = {}
    for source in (params, more):
        if not source:
            continue
        for key, value in source.items():
            old = overrides.get("cvar") if key == "cvar" else None
            if isinstance(old, Mapping) and isinstance(value, Mapping):
                value = {**old, **value}
            overrides[key] = value
    return True


def _said_misuse(kind: str) -> None:
    global _misuse_said
    level = logging.DEBUG if _misuse_said else logging.WARNING
    _misuse_said = True
    logger.log(
        level,
        "asgi_matomo: set_tracking_params was given %s instead of a dict of Matomo parameters;"
        " it is ignored (keyword arguments still count)",
        kind,
    )


def _said_too_late(params: object, more: Mapping[str, Any]) -> None:
    names = [*(params if isinstance(params, Mapping) else ()), *more]
    listed = ", ".join(shown(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
    # Once per call site (as told by the names it sets), within the budget of the kind.
    warn_once(
        f"too-late:{listed}",
        "asgi_matomo: set_tracking_params(%s) was called after the request's hit was built"
        " (the response had ended): the values are not sent. Set them before the response"
        " ends, or return them from the request_details function",
        listed,
    )


def fresh_state(scope: Scope) -> MutableMapping[str, Any] | None:
    """Give the request its own override dict, so both documented patterns work.

    Handlers may replace `scope["state"]["asgi_matomo"]` or mutate it. Servers
    copy app-level state into each request shallowly, so an inherited dict would
    be shared by every request: it is copied, never reused.
    """
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    elif state.__class__ is not dict and not isinstance(state, MutableMapping):
        return None
    inherited = state.get(STATE_KEY)
    if inherited is None:
        state[STATE_KEY] = {}
        return state
    # App-wide overrides from the lifespan state, or a server that hands every
    # request the same state dict: then an earlier request's mark goes too.
    state.pop(HIT_BUILT_KEY, None)
    # (`__class__ is dict` first: ABC isinstance checks are slow, and this runs per request.)
    state[STATE_KEY] = (
        dict(inherited) if inherited.__class__ is dict or isinstance(inherited, Mapping) else {}
    )
    return state


def read_overrides(
    scope: Scope, state: MutableMapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """What the handler set, read when the response ends, to build the request's hits.

    From then on, set_tracking_params answers False for this request.
    """
    if state is not None:
        state[HIT_BUILT_KEY] = True
        in_scope: object = scope.get("state")
        if in_scope is state:
            # The common case: the request's own state dict, still in place.
            own: Any = state.get(STATE_KEY)
            if own.__class__ is dict:
                return own
    for candidate in (scope.get("state"), state):
        if candidate is not None and (
            candidate.__class__ is dict or isinstance(candidate, Mapping)
        ):
            overrides = candidate.get(STATE_KEY)
            if overrides is not None and (
                overrides.__class__ is dict or isinstance(overrides, Mapping)
            ):
                return overrides
    return None
