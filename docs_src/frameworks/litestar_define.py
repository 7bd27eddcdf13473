from litestar import Litestar, get
from litestar.middleware import DefineMiddleware

from asgi_matomo import MatomoMiddleware


@get("/users/{user_id:int}")
async def user(user_id: int) -> str:
    return f"user {user_id}"


# Litestar runs app-level middleware after routing, for matched routes only:
# unmatched paths (404) are not tracked, and as Litestar keeps the lifespan to
# itself, each hit is sent right after its response instead of in batches.
app = Litestar(
    route_handlers=[user],
    middleware=[
        DefineMiddleware(
            MatomoMiddleware,  # type: ignore[arg-type]
            matomo_url="YOUR MATOMO TRACKING URL",
            idsite=12345,  # your service tracking id
        )
    ],
)
