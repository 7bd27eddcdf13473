import asyncio

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_matomo import MatomoMiddleware
from asgi_matomo.trackers import PerfMsTracker


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("home")


async def user(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"user {request.path_params['user_id']}")


async def about(request: Request) -> PlainTextResponse:
    return PlainTextResponse("about")


async def report(request: Request) -> PlainTextResponse:
    with PerfMsTracker(scope=request.scope, key="pf_srv"):
        await asyncio.sleep(0.05)  # e.g. a database query
    # Per-request overrides: what the handler knows, sent with this request's hit.
    request.scope["state"]["asgi_matomo"].update(action_name="Monthly report", cvar={"plan": "pro"})
    return PlainTextResponse("report")


async def create_item(request: Request) -> PlainTextResponse:
    return PlainTextResponse("created", status_code=201)


app = Starlette(
    routes=[
        Route("/", home),
        Route("/users/{user_id:int}", user),
        Route("/about", about),
        Route("/report", report),
        Route("/items", create_item, methods=["POST"]),
    ],
    middleware=[
        Middleware(
            MatomoMiddleware,
            matomo_url="YOUR MATOMO TRACKING URL",
            idsite=12345,  # your service tracking id
            route_details={"/about": {"action_name": "About us"}},
        )
    ],
)
