"""Track every request an ASGI app serves in Matomo."""

from __future__ import annotations

__version__ = "1.0.0.dev0"

__all__ = ["__version__"]
