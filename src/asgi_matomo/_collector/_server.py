"""The collector: a local Matomo 5.1 stand-in's state, lifecycle and request routing.

The endpoints live beside it: `_tracking` (matomo.php), `_reporting`
(index.php), `_views` (the visits log and its JSON API); the HTTP glue in
`_wire`, the SQLite store in `_store`, Matomo's rules for one hit in `_rules`;
`_serve` runs a collector in the foreground.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from asgi_matomo._collector._log import RefusalLog
from asgi_matomo._collector._model import ReceivedRequest, StoredHit
from asgi_matomo._collector._reporting import reporting_api
from asgi_matomo._collector._rules import (
    BRUTE_FORCE_LIMIT,
    ERROR_TEXT,
    GIF,
    TRACKING_PATHS,
    hit_row,
    site_id,
)
from asgi_matomo._collector._store import DEFAULT_MAX_HITS, HitStore
from asgi_matomo._collector._totals import MAX_REQUESTS_KEPT, RequestLog, Totals
from asgi_matomo._collector._tracking import Auth, Fault, tracking
from asgi_matomo._collector._views import (
    DEFAULT_API_LIMIT,
    PAGE_HITS,
    PAGE_VISITS,
    api_hits,
    api_totals,
    api_visits,
    page,
    visits_fragment,
)
from asgi_matomo._collector._visits import Visit, group_visits, matches
from asgi_matomo._collector._wire import (
    MAX_BODY,
    Answer,
    Handler,
    Server,
    read_body,
    shutdown_socket,
    write,
)

if TYPE_CHECKING:
    import os

__all__ = [
    "BRUTE_FORCE_LIMIT",
    "GIF",
    "PAGE_HITS",
    "PAGE_VISITS",
    "Collector",
    "ReceivedRequest",
    "StoredHit",
    "Totals",
]

LOGGER = logging.getLogger("asgi_matomo")

# stop() waits for the accept loop to notice: keep test suites' teardowns short.
POLL_INTERVAL = 0.01
# Sites the reporting API lists when every site is served (see _remember_site).
MAX_SEEN_SITES = 1000
# Peers whose failed logins are counted: more than a test or a demo ever has.
MAX_PEERS = 1000


class Collector:
    """A local Matomo 5.1 stand-in that stores hits in SQLite and shows them live.

    ```python
    with Collector(token="secret") as collector:
        ...  # send hits to collector.tracking_url
        hits = collector.wait_for_hits(3)
    ```

    Parameters:
        host: the address to listen on.
        port: the port; 0 picks a free one (kept for a restart after stop()).
        db_path: the SQLite file; None keeps the hits in memory.
        token: the `token_auth` with write access to every site; None: no token
            is ever right.
        sites: the site ids that exist; None: every site id exists.
        queued_tracking: answer like a Matomo with the QueuedTracking plugin:
            hits are queued and validated later, so answers carry no counts and
            refuse nothing but a `cip` without the right token.
        dimensions: names of custom dimension ids, for the page (e.g. the
            middleware's `custom_dimensions` turned around: `{3: "http_status_code"}`).
        max_hits: the most hits kept, in memory or in the file; the oldest go
            first (`totals()` still counts them). None: keep every hit.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        db_path: str | os.PathLike[str] | None = None,
        token: str | None = None,
        sites: Iterable[int] | None = None,
        queued_tracking: bool = False,
        dimensions: Mapping[int, str] | None = None,
        max_hits: int | None = DEFAULT_MAX_HITS,
    ) -> None:
        if max_hits is not None and (
            isinstance(max_hits, bool) or not isinstance(max_hits, int) or max_hits < 1
        ):
            raise ValueError(f"max_hits: a positive number of hits or None, got {max_hits!r}")
        self._host = host
        self._port = port
        self._token = token
        self._sites = None if sites is None else frozenset(sites)
        for site in self._sites or ():
            if isinstance(site, bool) or not isinstance(site, int) or site < 1:
                raise ValueError(f"sites: site ids are positive integers, got {site!r}")
        self._queued = queued_tracking
        self._refusals = RefusalLog()
        self._seen_sites: set[int] = set()
        self._dimensions = _dimension_names(dimensions)
        # Tells this collector's page versions from another's (a restart on the same file).
        self._page_epoch = secrets.token_hex(4)
        self._cond = threading.Condition()
        self._hit_store = HitStore(db_path, self._cond, max_hits)
        self._requests = RequestLog(MAX_REQUESTS_KEPT)
        self._failed_logins: dict[str, int] = {}
        self._fault: Fault | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        # While stopped, the port stays bound without listening: connections are
        # refused, as by a Matomo that is down, and no other server (an app a test
        # starts on "a free port") can be given it before the restart.
        # Held by a finalizer: a collector dropped while stopped closes it too.
        self._reserved: weakref.finalize[[], Collector] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Serve in a background thread; after stop(), serve again on the same port."""
        with self._cond:
            if self._server is not None:
                raise RuntimeError("the collector is already running")
            if self._reserved is not None:
                self._reserved()
                self._reserved = None
            server = Server((self._host, self._port), self)
            self._port = server.server_address[1]
            # A restart forgets the brute-force block, as its expiry would.
            self._failed_logins.clear()
            self._stopping = threading.Event()
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": POLL_INTERVAL},
                name=f"asgi-matomo-collector:{self._port}",
                daemon=True,
            )
            self._thread.start()
        LOGGER.debug("collector: listening on %s", self.base_url)

    def stop(self) -> None:
        """Stop serving and close every open connection (safe to call twice)."""
        with self._cond:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            self._stopping.set()
            connections = list(self._connections)
        server.shutdown()
        # Idle keep-alive connections would keep answering after the "outage".
        for connection in connections:
            shutdown_socket(connection)
        server.server_close()
        assert thread is not None
        thread.join()
        self._reserve_port()
        LOGGER.debug("collector: stopped")

    def _reserve_port(self) -> None:
        reserved = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        try:
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reserved.bind((self._host, self._port))
        except OSError:  # pragma: no cover - taken already: nothing to keep
            reserved.close()
            return
        with self._cond:
            kept = self._server is None and self._reserved is None
            if kept:
                self._reserved = weakref.finalize(self, reserved.close)
        if not kept:  # pragma: no cover - started again meanwhile
            reserved.close()

    def _release_port(self) -> None:
        with self._cond:
            reserved, self._reserved = self._reserved, None
        if reserved is not None:
            reserved()

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._release_port()

    @property
    def base_url(self) -> str:
        """The collector's address, e.g. `http://127.0.0.1:8765`."""
        if self._port == 0:
            raise RuntimeError("the collector has no port yet: call start() first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def tracking_url(self) -> str:
        """The Matomo tracking endpoint, `base_url + "/matomo.php"`."""
        return self.base_url + "/matomo.php"

    # -- what tests look at --------------------------------------------------

    def hits(self) -> list[StoredHit]:
        """Every hit kept (the latest `max_hits` stored), oldest first."""
        return self._select("SELECT * FROM hits ORDER BY id", ())

    def wait_for_hits(self, count: int, timeout: float = 10.0) -> list[StoredHit]:
        """Block until at least `count` hits are stored; TimeoutError after `timeout`.

        Returns the hits kept (the latest `max_hits` of them).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._hit_store.count >= count, timeout):
                recent = ", ".join(
                    f"{r.kind} {r.status} tracked={r.tracked} invalid={r.invalid}"
                    for r in list(self._requests.latest)[-5:]
                )
                raise TimeoutError(
                    f"expected at least {count} stored hits within {timeout}s, got"
                    f" {self._hit_store.count} from {self._requests.count} tracking requests"
                    f" (last ones: {recent or 'none'})"
                )
        return self.hits()

    @property
    def requests(self) -> list[ReceivedRequest]:
        """The HTTP requests received at the tracking endpoint, oldest first.

        The latest `MAX_REQUESTS_KEPT` (10,000) only: `totals()` counts them all.
        """
        with self._cond:
            return list(self._requests.latest)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Block until at least `count` tracking requests were answered (see `requests`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._requests.count >= count, timeout):
                raise TimeoutError(
                    f"expected at least {count} tracking requests within {timeout}s,"
                    f" got {self._requests.count}"
                )
            return list(self._requests.latest)

    def totals(self) -> Totals:
        """Exact counts of the hits stored and the requests answered since the start."""
        with self._cond:
            return Totals.of(self._hit_store, self._requests)

    def set_fault(
        self,
        *,
        status: int | None = None,
        delay: float = 0.0,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        count: int | None = None,
        drop: bool = False,
    ) -> None:
        """Misbehave on the next `count` tracking requests (None: until cleared).

        Each faulted request waits `delay` seconds (stop() interrupts the wait),
        then: with `drop`, closes the connection without an answer; with a
        `status`, answers it with `body` and `headers` and stores nothing;
        otherwise it is handled normally (a slow Matomo), unless the client gave
        up waiting meanwhile (a client timeout): then nothing is stored.
        """
        if count is not None and count < 1:
            raise ValueError(f"count: a positive number of requests or None, got {count!r}")
        if delay < 0:
            raise ValueError(f"delay: seconds >= 0, got {delay!r}")
        with self._cond:
            self._fault = Fault(status, delay, body, dict(headers or {}), count, drop)

    def clear_fault(self) -> None:
        """Behave like a healthy Matomo again."""
        with self._cond:
            self._fault = None

    def api_hits(
        self, *, limit: int = DEFAULT_API_LIMIT, q: str = "", since_id: int = 0
    ) -> list[StoredHit]:
        """The hits `/api/hits` shows: newest first, filtered on url/action_name."""
        sql = "SELECT * FROM hits WHERE id > ?"
        args: list[object] = [since_id]
        if q:
            needle = q.lower()
            sql += " AND (instr(lower(url), ?) > 0 OR instr(lower(action_name), ?) > 0)"
            args += [needle, needle]
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self._select(sql, args)

    def visits(self, *, q: str = "", last_hits: int = PAGE_HITS) -> list[Visit]:
        """The latest `last_hits` hits grouped into visits the way Matomo groups them.

        Newest visit first; with `q`, only the visits with a text that contains it.
        """
        hits = self._select("SELECT * FROM hits ORDER BY id DESC LIMIT ?", (last_hits,))
        return [v for v in group_visits(hits) if matches(v, q, self._dimensions)]

    # -- storage -------------------------------------------------------------

    def _select(self, sql: str, args: Iterable[object]) -> list[StoredHit]:
        return self._hit_store.select(sql, args)

    def _store(self, rows: list[dict[str, object]]) -> None:
        if not rows:
            return
        with self._cond:
            self._hit_store.insert(rows)
            self._cond.notify_all()

    def _record(self, request: ReceivedRequest) -> None:
        with self._cond:
            self._requests.add(request)
            self._cond.notify_all()

    # -- connections ---------------------------------------------------------

    def _register(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.add(connection)
            stopping = self._stopping.is_set()
        if stopping:  # pragma: no cover - a connection accepted while stop() runs
            shutdown_socket(connection)

    def _unregister(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)

    # -- HTTP ----------------------------------------------------------------

    def _handle(self, handler: Handler) -> None:
        split = urlsplit(handler.path)
        body = read_body(handler)
        if body is None:
            handler.close_connection = True
            self._refusals.refused(
                "size", f"refused a request body over {MAX_BODY} bytes (413): send smaller batches"
            )
            write(handler, Answer(413, ERROR_TEXT, "text/html; charset=utf-8"))
            return
        path = split.path
        if path in TRACKING_PATHS:
            answer = tracking(self, handler, split.query, body)
        elif path == "/index.php":
            answer = reporting_api(self, handler, split.query, body)
        elif path in ("/", "/index.html") and handler.command == "GET":
            answer = page(self, split.query)
        elif path == "/visits.html" and handler.command == "GET":
            answer = visits_fragment(self, handler, split.query)
        elif path == "/api/visits" and handler.command == "GET":
            answer = api_visits(self, split.query)
        elif path == "/api/hits" and handler.command == "GET":
            answer = api_hits(self, split.query)
        elif path == "/api/totals" and handler.command == "GET":
            answer = api_totals(self)
        else:
            answer = Answer(404, b"Not found\n", "text/plain; charset=utf-8")
        if answer is None:
            handler.close_connection = True
            LOGGER.debug("collector: %s %s -> no answer", handler.command, path)
            return
        # Never the query: it may carry token_auth.
        LOGGER.debug("collector: %s %s -> %d", handler.command, path, answer.status)
        write(handler, answer)

    def _auth(self, peer: str, tokens: Iterable[str]) -> Auth:
        """Count failed logins and tell whether the peer is blocked."""
        tokens = [token for token in tokens if token]
        failed = 0
        with self._cond:
            blocked = self._failed_logins.get(peer, 0) >= BRUTE_FORCE_LIMIT
            if not blocked and any(not self._token_is_right(t) for t in tokens):
                failed = self._failed_logins.pop(peer, 0) + 1
                if len(self._failed_logins) >= MAX_PEERS:
                    # Bounded whatever the peers: the peer heard of longest ago goes.
                    del self._failed_logins[next(iter(self._failed_logins))]
                self._failed_logins[peer] = failed
        if failed:
            self._refusals.refused(
                "token",
                f"a wrong token_auth from {peer}, failed login {failed} of"
                f" {BRUTE_FORCE_LIMIT} before it is blocked: {self._token_fix()}",
                peer,
            )
        return Auth(token=tokens[0] if tokens else None, blocked=blocked and bool(tokens))

    def _token_fix(self) -> str:
        if self._token is None:
            return "start the collector with --token <t> and give the tracker the same token"
        return "give the tracker the collector's --token (access_token=)"

    def _remember_site(self, site: int) -> None:
        # With every site served, the reporting API can only list the sites it
        # has heard of; bounded whatever the senders send.
        if self._sites is not None:
            return
        with self._cond:
            if len(self._seen_sites) < MAX_SEEN_SITES:
                self._seen_sites.add(site)

    def _token_is_right(self, token: str | None) -> bool:
        if not token or self._token is None:
            return False
        return hmac.compare_digest(token.encode(), self._token.encode())

    def _take_fault(self) -> Fault | None:
        with self._cond:
            fault = self._fault
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
                # Lets a test wait until a faulted request has arrived.
                self._cond.notify_all()
            return fault

    def _check_site(self, params: Mapping[str, str]) -> int:
        """The hit's site id; InvalidHitError when Matomo has no such site."""
        site = site_id(params, self._sites)
        self._remember_site(site)
        return site

    def _validate(
        self, params: dict[str, str], token: str | None, handler: Handler, now: float
    ) -> dict[str, object]:
        """The row Matomo would store for one hit; InvalidHitError when it refuses it."""
        authorized = self._token_is_right(token)
        idsite = self._check_site(params)
        return hit_row(
            params,
            idsite=idsite,
            token=token,
            authorized=authorized,
            token_fix=self._token_fix(),
            peer=handler.client_address[0],
            user_agent=handler.headers.get("User-Agent"),
            accept_language=handler.headers.get("Accept-Language"),
            now=now,
        )


def _dimension_names(names: Mapping[int, str] | None) -> dict[int, str]:
    checked: dict[int, str] = {}
    for dimension, name in (names or {}).items():
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise ValueError(f"dimensions: ids are positive integers, got {dimension!r}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"dimensions: a name for dimension {dimension}, got {name!r}")
        checked[dimension] = name.strip()
    return checked
