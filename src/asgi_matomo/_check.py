"""`asgi-matomo check`: ask a real Matomo whether it will take the middleware's hits.

Nothing it sends records a visit (MATOMO.md): probes without `rec=1` and the
reporting API.
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from asgi_matomo import __version__

__all__ = ["CheckError", "check"]

CHECK_TIMEOUT = 10.0
TRACKER_SCRIPTS = ("matomo.php", "piwik.php", "index.php")
GIF_MAGIC = (b"GIF87a", b"GIF89a")
USER_AGENT = f"asgi-matomo-check/{__version__}"


class CheckError(Exception):
    """A check failed; the message tells the user what to do."""


@dataclass
class _Report:
    out: TextIO
    failed: bool = False

    def ok(self, what: str, detail: str) -> None:
        print(f"[ok]   {what}: {detail}", file=self.out)

    def fail(self, what: str, detail: str) -> None:
        self.failed = True
        print(f"[FAIL] {what}: {detail}", file=self.out)

    def note(self, what: str, detail: str) -> None:
        print(f"[--]   {what}: {detail}", file=self.out)


def _base_url(matomo_url: str) -> str:
    """Matomo's root URL from what the user gave (with or without /matomo.php)."""
    try:
        split = urlsplit(matomo_url.strip())
        port_ok = split.port is None or split.port > 0  # .port: ValueError if out of range
    except ValueError:
        port_ok = False
    if not port_ok or split.scheme not in ("http", "https") or not split.netloc:
        raise CheckError(
            f"{matomo_url!r} is not an http(s) URL: give Matomo's address, e.g."
            " https://matomo.example.com or https://matomo.example.com/matomo.php"
        )
    path = split.path.rstrip("/")
    last = path.rpartition("/")[2]
    if last in TRACKER_SCRIPTS:
        path = path[: -len(last)].rstrip("/")
    return f"{split.scheme}://{split.netloc}{path}"


def _describe_error(exc: httpx.HTTPError, url: str) -> str:
    """A network error as something the user can act on."""
    text = str(exc)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = getattr(cause, "verify_message", None) or cause
            return (
                f"TLS certificate of {url} not trusted ({reason}): fix the server's"
                " certificate chain, or use the URL its certificate is issued for"
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {url} failed ({cause}): is it really an https server?"
        cause = cause.__cause__ or cause.__context__
    lowered = text.lower()
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {url} within {CHECK_TIMEOUT:g}s: check firewall and address"
    if "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"TLS error with {url} ({text}): fix the certificate or the URL scheme"
    if any(
        marker in lowered
        for marker in (
            "name or service not known",
            "nodename nor servname",
            "getaddrinfo",
            "name resolution",
            "no address associated",
        )
    ):
        host = urlsplit(url).hostname
        return f"cannot resolve host {host!r} (DNS): check the spelling of the Matomo URL"
    if "refused" in lowered:
        return f"connection refused by {url}: is Matomo running, and on this port?"
    return f"cannot reach {url} ({text or type(exc).__name__})"


def _check_tracker(client: httpx.Client, base: str, idsite: int, report: _Report) -> bool:
    url = f"{base}/matomo.php"
    # The site's id without rec=1: a healthy Matomo answers success (204) and
    # records nothing; without an idsite, or with an unknown one, it answers
    # 400 (MATOMO.md, "Probes that record nothing").
    try:
        response = client.get(url, params={"idsite": str(idsite), "send_image": "0"})
    except httpx.HTTPError as exc:
        report.fail("tracker", _describe_error(exc, url))
        return False
    status = response.status_code
    if response.is_redirect:
        location = response.headers.get("Location", "?")
        report.fail(
            "tracker",
            f"{url} redirects ({status}) to {location}: give the final Matomo URL, trackers"
            " do not follow redirects for POST",
        )
        return False
    body = response.content
    if status == 204 or (status == 200 and body.startswith(GIF_MAGIC)):
        report.ok("tracker", f"{url} answers like Matomo ({status})")
        return True
    if status == 400 and _is_matomo_tracker(client, url):
        report.ok("tracker", f"{url} is Matomo's tracker")
        report.fail(
            "site",
            f"site {idsite} does not exist in this Matomo: its tracker refuses it (400,"
            " Invalid idSite). Check --idsite (Matomo > Administration > Websites)",
        )
        return False
    if status == 404:
        report.fail("tracker", f"{url} not found (404): is Matomo installed at {base}/?")
    elif status == 503:
        report.fail("tracker", f"{url} answers 503: Matomo's tracking is disabled or down")
    elif status >= 400:
        report.fail("tracker", f"{url} answers HTTP {status}: see Matomo's web server logs")
    else:
        report.fail(
            "tracker",
            f"{url} answers {status} ({response.headers.get('Content-Type', 'no type')}),"
            " not like a Matomo tracker: check the URL",
        )
    return False


def _is_matomo_tracker(client: httpx.Client, url: str) -> bool:
    """Whether `url` answers a request without parameters with Matomo's text."""
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and b"Matomo" in response.content


def _check_bulk(client: httpx.Client, base: str, idsite: int, report: _Report) -> bool:
    """The bulk probe; True when QueuedTracking answers it (no counts)."""
    what = "bulk tracking"
    url = f"{base}/matomo.php"
    # The sender batches hits in bulk POSTs: a proxy may refuse POST or JSON
    # bodies. An element without rec=1 is answered and not recorded (MATOMO.md).
    try:
        response = client.post(url, json={"requests": [f"?idsite={idsite}&send_image=0"]})
    except httpx.HTTPError as exc:
        report.fail(what, _describe_error(exc, url))
        return False
    status = response.status_code
    try:
        data = response.json()
    except ValueError:
        data = None
    if status == 200 and isinstance(data, dict) and data.get("status") == "success":
        if data.get("invalid"):
            report.fail(
                what,
                f"POST {url} counts the probe for site {idsite} invalid: batched hits for"
                " this site would be refused, check --idsite",
            )
        else:
            report.ok(what, f"POST {url} answers Matomo's JSON: batches are accepted")
        return False
    if status == 204 or (status == 200 and response.content.startswith(GIF_MAGIC)):
        closes = response.headers.get("Connection", "").lower() == "close"
        report.ok(what, f"POST {url} accepts batches")
        report.note(
            "QueuedTracking",
            f"the bulk answer is {status} {response.headers.get('Content-Type', '')}"
            f"{' with Connection: close' if closes else ''}, without counts: the"
            " QueuedTracking plugin is in front. It queues every request and validates"
            " hits later, when a worker replays the queue, so a hit Matomo refuses (an"
            " unknown idsite, a bad parameter) is dropped in silence and counted as sent;"
            " only a cip without the right token is refused at once (400). Set the"
            " plugin's 'Number of requests to process at once' to 1: each batch is one"
            " queued request, and with the default (25) nothing is stored until 25"
            " batches wait.",
        )
        return True
    if status == 413:
        report.fail(what, f"POST {url} refused as too large (413): raise the body limit")
    else:
        report.fail(
            what,
            f"POST {url} answers HTTP {status}, not Matomo's JSON: batched hits would be"
            " lost. Is a proxy or firewall refusing POST requests or JSON bodies?",
        )
    return False


def _api(client: httpx.Client, base: str, method: str, token: str, **params: str) -> Any:
    """One reporting-API call; the token travels in the POST body, never in the URL."""
    url = f"{base}/index.php"
    form = {"module": "API", "method": method, "format": "json", "token_auth": token, **params}
    try:
        response = client.post(url, data=form)
    except httpx.HTTPError as exc:
        raise CheckError(_describe_error(exc, url)) from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    # Matomo answers errors with HTTP 200, some versions with 401 for a bad
    # token: its JSON error says more than the status.
    if _api_error(data) is not None:
        return data
    if response.status_code != 200:
        raise CheckError(
            f"the reporting API at {url} answers HTTP {response.status_code}: it may be"
            " blocked for this client (the tracker itself may still work)"
        )
    if data is None:
        raise CheckError(
            f"{url} does not answer like Matomo's reporting API (no JSON): check the URL"
        )
    return data


def _api_error(data: Any) -> str | None:
    if isinstance(data, dict) and data.get("result") == "error":
        return str(data.get("message", "unknown error"))
    return None


def _check_site(client: httpx.Client, base: str, idsite: int, token: str, report: _Report) -> bool:
    try:
        data = _api(client, base, "SitesManager.getSiteFromId", token, idSite=str(idsite))
    except CheckError as exc:
        report.fail("site", str(exc))
        return False
    error = _api_error(data)
    if error is not None:
        lowered = error.lower()
        if "unexpected website" in lowered or "does not exist" in lowered:
            report.fail("site", f"site {idsite} does not exist in this Matomo: check --idsite")
        elif any(word in lowered for word in ("access", "token", "authenticat", "log in")):
            report.fail(
                "token",
                f"the token is not accepted for site {idsite} (Matomo says: {error})."
                " Create a token in Matomo > Personal > Security for a user with write"
                " access to the site. Beware: each wrong token counts as a failed login"
                " and about 20 of them get this server's IP blocked.",
            )
        else:
            report.fail("site", f"Matomo answered an error: {error}")
        return False
    if not isinstance(data, dict) or str(data.get("idsite")) != str(idsite):
        report.fail("site", "unexpected answer from the reporting API: is this a Matomo server?")
        return False
    name = data.get("name", "?")
    report.ok("site", f"site {idsite} exists ({name!r}, {data.get('main_url', '?')})")
    return True


def _check_cip(client: httpx.Client, base: str, idsite: int, token: str, report: _Report) -> None:
    what = "cip (visitor IPs)"
    try:
        data = _api(client, base, "SitesManager.getSitesIdWithAdminAccess", token)
    except CheckError as exc:
        report.fail(what, f"could not check the token's access level: {exc}")
        return
    error = _api_error(data)
    if error is None and isinstance(data, list) and str(idsite) in {str(s) for s in data}:
        report.ok(what, f"the token has admin access to site {idsite}: cip is accepted")
        return
    # The reporting API lists admin sites, not write-only ones: a user with the
    # "write" role may send cip but cannot be told apart from a view-only user.
    report.fail(
        what,
        f"NOT VERIFIED: the token has no admin access to site {idsite}. Matomo accepts"
        " cip with write, admin or super-user access; if this token's user has the"
        " 'write' role it works, otherwise every hit sent with cip is refused (400)."
        " Grant write access or use a token of a user who has it.",
    )


def check(
    matomo_url: str,
    idsite: int,
    token: str | None,
    *,
    out: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
) -> bool:
    """Check a Matomo server without recording a visit; True when all is well.

    `transport` replaces the network, e.g. with `httpx.MockTransport` in tests.
    """
    report = _Report(out or sys.stdout)
    try:
        base = _base_url(matomo_url)
    except CheckError as exc:
        report.fail("url", str(exc))
        return False
    headers = {"User-Agent": USER_AGENT}
    with httpx.Client(
        timeout=CHECK_TIMEOUT, headers=headers, verify=True, transport=transport
    ) as client:
        if not _check_tracker(client, base, idsite, report):
            return False
        queued = _check_bulk(client, base, idsite, report)
        if token is None:
            if queued:
                report.note(
                    "site",
                    "not checked: a queued tracker accepts any idsite; --token lets the"
                    " reporting API check it",
                )
            else:
                report.ok("site", f"the tracker accepts site {idsite}")
            report.note(
                "cip (visitor IPs)",
                "impossible without a token: every hit will carry the app server's IP",
            )
            return not report.failed
        if _check_site(client, base, idsite, token, report):
            _check_cip(client, base, idsite, token, report)
    return not report.failed
