import asyncio

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from asgi_matomo import MatomoMiddleware
from asgi_matomo.trackers import PerfMsTracker

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
async def home() -> str:
    return "home"


@app.get("/about", response_class=PlainTextResponse)
async def about() -> str:
    return "about"


@app.get("/report", response_class=PlainTextResponse)
async def report(request: Request) -> str:
    with PerfMsTracker(scope=request.scope, key="pf_srv"):
        await asyncio.sleep(0.05)  # e.g. a database query
    # Per-request overrides: what the handler knows, sent with this request's hit.
    request.scope["state"]["asgi_matomo"].update(action_name="Monthly report", cvar={"plan": "pro"})
    return "report"


@app.post("/items", status_code=201, response_class=PlainTextResponse)
async def create_item() -> str:
    return "created"


# An APIRouter prefix is part of the route template: /users/{user_id}.
users = APIRouter(prefix="/users")


@users.get("/{user_id}", response_class=PlainTextResponse)
async def user(user_id: int) -> str:
    return f"user {user_id}"


app.include_router(users)

# A mounted sub-application: its routes are tracked by the outer middleware,
# with the mount prefix in the URL and in the template (/shop/items/{item_id}).
shop = FastAPI()


@shop.get("/items/{item_id}", response_class=PlainTextResponse)
async def shop_item(item_id: int) -> str:
    return f"item {item_id}"


app.mount("/shop", shop)

app.add_middleware(
    MatomoMiddleware,
    matomo_url="YOUR MATOMO TRACKING URL",
    idsite=12345,  # your service tracking id
    route_details={"/about": {"action_name": "About us"}},
)
