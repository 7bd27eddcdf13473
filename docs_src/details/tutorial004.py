from asgi_matomo import MatomoMiddleware, set_tracking_params
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def load_report(name: str) -> dict[str, str]:
    # Deep in the code, no request in sight: the parameters still reach its hit.
    set_tracking_params(dimension1=name, cvar={"report": name})
    return {"report": name}


def report(request: Request):
    # A sync endpoint: Starlette runs it in a thread pool, which works too.
    return JSONResponse(load_report(request.path_params["name"]))


app = Starlette(
    routes=[Route("/reports/{name}", report)],
    middleware=[
        Middleware(
            MatomoMiddleware,
            matomo_url="YOUR MATOMO TRACKING URL",
            idsite=12345,  # your service tracking id
        )
    ],
)
