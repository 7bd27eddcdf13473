"""Run a collector in the foreground until Ctrl-C or SIGTERM (`asgi-matomo collector`)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from asgi_matomo._collector._server import Collector
from asgi_matomo._collector._store import DEFAULT_MAX_HITS

if TYPE_CHECKING:
    import os
    from types import FrameType

__all__ = ["serve", "terminate_on_sigterm"]

LOGGER = logging.getLogger("asgi_matomo")


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so both stop serve() the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    db_path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    sites: Iterable[int] | None = None,
    *,
    queued_tracking: bool = False,
    ready: Callable[[Collector], None] | None = None,
    dimensions: Mapping[int, str] | None = None,
    max_hits: int | None = DEFAULT_MAX_HITS,
) -> None:
    """Run a collector until Ctrl-C or SIGTERM.

    ```python
    serve("127.0.0.1", 8765, "hits.sqlite", token="secret", sites=[1, 2])
    ```

    Parameters are those of `Collector`; `ready` is called once it listens.
    """
    collector = Collector(
        host=host,
        port=port,
        db_path=db_path,
        token=token,
        sites=sites,
        queued_tracking=queued_tracking,
        dimensions=dimensions,
        max_hits=max_hits,
    )
    # Never set: serve() returns only on Ctrl-C or SIGTERM.
    forever = threading.Event()
    with terminate_on_sigterm():
        collector.start()
        try:
            if ready is not None:
                ready(collector)
            forever.wait()  # pragma: no cover - left by an exception only
        except KeyboardInterrupt:
            LOGGER.debug("collector: interrupted")
        finally:
            collector.__exit__(None, None, None)
