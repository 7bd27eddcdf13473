import asyncio

from litestar import Litestar, Request, get, post

from asgi_matomo import MatomoMiddleware
from asgi_matomo.trackers import PerfMsTracker


@get("/")
async def home() -> str:
    return "home"


@get("/users/{user_id:int}")
async def user(user_id: int) -> str:
    return f"user {user_id}"


@get("/about")
async def about() -> str:
    return "about"


@get("/report")
async def report(request: Request) -> str:  # type: ignore[type-arg]
    with PerfMsTracker(scope=request.scope, key="pf_srv"):
        await asyncio.sleep(0.05)  # e.g. a database query
    # Per-request overrides: what the handler knows, sent with this request's hit.
    request.scope["state"]["asgi_matomo"].update(action_name="Monthly report", cvar={"plan": "pro"})
    return "report"


@post("/items")  # Litestar answers a POST with 201 Created
async def create_item() -> str:
    return "created"


# Wrap the whole app: the middleware then sees every request, unmatched paths
# (404) included, and runs its sender in the app's lifespan.
app = MatomoMiddleware(
    Litestar(route_handlers=[home, user, about, report, create_item]),
    matomo_url="YOUR MATOMO TRACKING URL",
    idsite=12345,  # your service tracking id
    route_details={"/about": {"action_name": "About us"}},
)
