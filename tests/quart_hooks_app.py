"""A Quart app whose own `before_request` hook answers some requests early.

Served by a real uvicorn in tests/test_contrib.py: the route template must reach
the middleware whether the hook was registered before `add_route_templates`
(app-wide or on a blueprint) or after it.
"""

from __future__ import annotations

from quart import Blueprint, Quart, request

from asgi_matomo import MatomoMiddleware
from asgi_matomo.contrib.quart import add_route_templates

app = Quart(__name__)


@app.before_request
async def closed_for_maintenance() -> tuple[str, int] | None:
    # Registered before add_route_templates: it must not keep the template away.
    if request.path.startswith("/closed/"):
        return "closed", 503
    return None


shop = Blueprint("shop", __name__, url_prefix="/shop")


@shop.before_request
async def login_required() -> tuple[str, int] | None:
    return ("log in first", 401) if "token" not in request.args else None


@shop.get("/items/<int:item_id>")
async def item(item_id: int) -> str:
    return f"item {item_id}"


@app.get("/closed/<name>")
async def closed(name: str) -> str:
    return name  # never reached


@app.get("/open/<name>")
async def open_page(name: str) -> str:
    return name


app.register_blueprint(shop)
add_route_templates(app)


@app.before_request
async def answered_later() -> tuple[str, int] | None:
    # Registered after add_route_templates.
    return ("late hook", 409) if request.path == "/open/late" else None


app.asgi_app = MatomoMiddleware(  # type: ignore[assignment,method-assign]
    app.asgi_app, matomo_url="https://matomo.example.org", idsite=1
)
