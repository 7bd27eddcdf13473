"""The package version, in a module of its own so that any module may import it."""

from __future__ import annotations

__version__ = "1.0.0.dev0"
