from asgi_matomo import MatomoMiddleware
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class BearerBackend(AuthenticationBackend):
    """Stands in for your real authentication."""

    async def authenticate(self, conn: HTTPConnection):
        token = conn.headers.get("authorization", "").removeprefix("Bearer ")
        if not token:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(token)


def account(scope) -> str | None:
    # Hashed before it leaves: Matomo sees the same pseudonym on every visit of
    # this account, never the account name. None: the default visitor id.
    user = scope.get("user")
    return user.username if user is not None and user.is_authenticated else None


def matomo_details(scope, status: int) -> dict[str, str]:
    # Runs when the response ends, after the authentication middleware ran.
    user = scope.get("user")
    signed_in = user is not None and user.is_authenticated
    return {"dimension1": "signed-in" if signed_in else "anonymous"}


async def homepage(request: Request):
    return JSONResponse({"hello": "world"})


app = Starlette(
    routes=[Route("/", homepage)],
    middleware=[
        Middleware(
            MatomoMiddleware,
            matomo_url="YOUR MATOMO TRACKING URL",
            idsite=12345,  # your service tracking id
            visitor_id=account,
            request_details=matomo_details,
        ),
        Middleware(AuthenticationMiddleware, backend=BearerBackend()),
    ],
)
