"""A one-file Django project: settings in code, no database."""

import asyncio

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse
from django.urls import path

from asgi_matomo import MatomoMiddleware
from asgi_matomo.trackers import PerfMsTracker


async def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("home")


async def user(request: HttpRequest, user_id: int) -> HttpResponse:
    return HttpResponse(f"user {user_id}")


async def about(request: HttpRequest) -> HttpResponse:
    return HttpResponse("about")


async def report(request: HttpRequest) -> HttpResponse:
    # Django's ASGI request keeps the ASGI scope as `request.scope`.
    with PerfMsTracker(scope=request.scope, key="pf_srv"):  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)  # e.g. a database query
    # Per-request overrides: what the view knows, sent with this request's hit.
    request.scope["state"]["asgi_matomo"].update(  # type: ignore[attr-defined]
        action_name="Monthly report", cvar={"plan": "pro"}
    )
    return HttpResponse("report")


async def create_item(request: HttpRequest) -> HttpResponse:
    return HttpResponse("created", status=201)


urlpatterns = [
    path("", home),
    path("users/<int:user_id>", user),
    path("about", about),
    path("report", report),
    path("items", create_item),
]

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    SECRET_KEY="change me",  # noqa: S106 - a placeholder, as in Django's own templates
    DATABASES={},
    INSTALLED_APPS=[],
    # Hands the matched URL pattern to asgi-matomo, for action_name_from_route=True.
    MIDDLEWARE=["asgi_matomo.contrib.django.MatomoRouteMiddleware"],
)

application = MatomoMiddleware(
    get_asgi_application(),
    matomo_url="YOUR MATOMO TRACKING URL",
    idsite=12345,  # your service tracking id
    route_details={"/about": {"action_name": "About us"}},
)
