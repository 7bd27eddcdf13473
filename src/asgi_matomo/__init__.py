"""Track every request an ASGI app serves in Matomo."""

from __future__ import annotations

from asgi_matomo._middleware import MatomoMiddleware
from asgi_matomo._sender import Stats

__version__ = "1.0.0.dev0"

__all__ = ["MatomoMiddleware", "Stats", "__version__"]
