"""The public API is exactly what __all__ says, and nothing private leaks into it."""

from __future__ import annotations

import asgi_matomo
import asgi_matomo.trackers


def test_all_is_sorted_and_complete() -> None:
    exported = set(asgi_matomo.__all__)
    public = {name for name in dir(asgi_matomo) if not name.startswith("_")} | {"__version__"}
    # Submodules are reachable as attributes once imported; they are not exports.
    # `from __future__ import annotations` is not an export either.
    public -= {"trackers", "testing", "contrib", "annotations"}
    assert exported == public
    assert asgi_matomo.__all__ == sorted(asgi_matomo.__all__)


def test_public_names_live_in_the_public_package() -> None:
    for name in asgi_matomo.__all__:
        if name != "__version__":
            assert getattr(asgi_matomo, name).__module__.startswith("asgi_matomo.")


def test_trackers_module_is_public() -> None:
    assert asgi_matomo.trackers.__all__ == ["PerfMsTracker"]
