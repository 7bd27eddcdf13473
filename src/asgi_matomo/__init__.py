"""Track every request an ASGI app serves in Matomo."""

from __future__ import annotations

from asgi_matomo._middleware import MatomoMiddleware
from asgi_matomo._sender import Stats
from asgi_matomo._state import set_tracking_params
from asgi_matomo._version import __version__

__all__ = ["MatomoMiddleware", "Stats", "__version__", "set_tracking_params"]
