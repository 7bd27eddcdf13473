import asyncio

from quart import Quart, request

from asgi_matomo import MatomoMiddleware
from asgi_matomo.contrib.quart import add_route_templates
from asgi_matomo.trackers import PerfMsTracker

app = Quart(__name__)
# Quart keeps the matched rule to itself: hand its template (/users/<int:user_id>)
# to asgi-matomo, for action_name_from_route=True.
add_route_templates(app)


@app.get("/")
async def home() -> str:
    return "home"


@app.get("/users/<int:user_id>")
async def user(user_id: int) -> str:
    return f"user {user_id}"


@app.get("/about")
async def about() -> str:
    return "about"


@app.get("/report")
async def report() -> str:
    with PerfMsTracker(scope=request.scope, key="pf_srv"):
        await asyncio.sleep(0.05)  # e.g. a database query
    # Per-request overrides: what the handler knows, sent with this request's hit.
    request.scope["state"]["asgi_matomo"].update(action_name="Monthly report", cvar={"plan": "pro"})
    return "report"


@app.post("/items")
async def create_item() -> tuple[str, int]:
    return "created", 201


# Wrap the ASGI callable, not the Quart object, so app.run() and the CLI keep working.
app.asgi_app = MatomoMiddleware(  # type: ignore[assignment,method-assign]
    app.asgi_app,
    matomo_url="YOUR MATOMO TRACKING URL",
    idsite=12345,  # your service tracking id
    route_details={"/about": {"action_name": "About us"}},
)
