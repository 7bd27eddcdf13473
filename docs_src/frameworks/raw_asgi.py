import asyncio

from asgi_matomo import MatomoMiddleware
from asgi_matomo.trackers import PerfMsTracker


async def respond(send, status, text):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def raw_app(scope, receive, send):
    if scope["type"] != "http":
        return  # no lifespan handling needed: the middleware answers it
    method, path = scope["method"], scope["path"]
    if method == "GET" and path == "/":
        await respond(send, 200, "home")
    elif method == "GET" and path.startswith("/users/") and path[7:].isdigit():
        # No router, no template: say which "route" this is, if you like.
        scope["route"] = "/users/{user_id}"
        await respond(send, 200, f"user {path[7:]}")
    elif method == "GET" and path == "/about":
        await respond(send, 200, "about")
    elif method == "GET" and path == "/report":
        with PerfMsTracker(scope=scope, key="pf_srv"):
            await asyncio.sleep(0.05)  # e.g. a database query
        scope["state"]["asgi_matomo"].update(action_name="Monthly report", cvar={"plan": "pro"})
        await respond(send, 200, "report")
    elif method == "POST" and path == "/items":
        await respond(send, 201, "created")
    else:
        await respond(send, 404, "not found")


app = MatomoMiddleware(
    raw_app,
    matomo_url="YOUR MATOMO TRACKING URL",
    idsite=12345,  # your service tracking id
    route_details={"/about": {"action_name": "About us"}},
)
