"""`python -m asgi_matomo`: the same as the `asgi-matomo` command."""

from __future__ import annotations

from asgi_matomo._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
