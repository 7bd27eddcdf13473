"""Just enough of Matomo's reporting API (`index.php?module=API`) for `asgi-matomo check`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asgi_matomo._collector._rules import BLOCKED_MESSAGE, InvalidHitError, query_params
from asgi_matomo._collector._wire import Answer, Handler, json_answer

if TYPE_CHECKING:
    from asgi_matomo._collector._server import Collector

__all__ = ["reporting_api"]


def reporting_api(collector: Collector, handler: Handler, query: str, body: bytes) -> Answer:
    """Just enough of Matomo's reporting API for `asgi-matomo check`."""
    params = query_params(query)
    if handler.command == "POST":
        params.update(query_params(body.decode("utf-8", "replace")))
    if params.get("module") != "API":
        return Answer(200, b"<html><body>Matomo</body></html>\n", "text/html; charset=utf-8")
    token = params.get("token_auth", "")
    auth = collector._auth(handler.client_address[0], [token])
    if auth.blocked:
        return _api_error(BLOCKED_MESSAGE)
    authorized = collector._token_is_right(token)
    method = params.get("method", "")
    if method == "SitesManager.getSitesIdWithAdminAccess":
        sites = collector._seen_sites if collector._sites is None else collector._sites
        with collector._cond:
            listed = sorted(sites)
        return json_answer(200, listed if authorized else [])
    if method != "SitesManager.getSiteFromId":
        module, _, name = method.partition(".")
        return _api_error(
            f"The method '{name}' does not exist or is not available in the module '{module}'."
        )
    id_site = params.get("idSite", "")
    if not id_site:
        return _api_error("Please specify a value for 'idSite'.")
    if token and not authorized:
        return _api_error(
            "Unable to authenticate with the provided token. It is either invalid or expired."
        )
    if not authorized:
        return _api_error(
            "You can't access this resource as it requires 'view' access for the"
            f" website id = {id_site}."
        )
    try:
        site = collector._check_site({"idsite": id_site})
    except InvalidHitError:
        site = 0
    if not site:
        return _api_error(
            f"An unexpected website was found in the request: website id was set to '{id_site}' ."
        )
    return json_answer(
        200,
        {
            "idsite": site,
            "name": f"Site {site}",
            "main_url": "http://localhost",
            "ts_created": "2024-01-01 00:00:00",
            "timezone": "UTC",
            "currency": "USD",
            "type": "website",
        },
    )


def _api_error(message: str) -> Answer:
    # Matomo's reporting API answers errors with HTTP 200.
    return json_answer(200, {"result": "error", "message": message})
