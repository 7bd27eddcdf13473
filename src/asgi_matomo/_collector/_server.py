"""A local stand-in for a Matomo 5.1 server: what tests and the demo send hits to.

Every answer follows what Matomo's tracker does (read from its source and
verified on a real Matomo 5.1.2). Standard library only: the package's one runtime
dependency is httpx and the collector must not add another.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import re
import secrets
import select
import signal
import socket
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from asgi_matomo._collector._log import RefusalLog
from asgi_matomo._collector._page import render_page, render_visits
from asgi_matomo._collector._visits import Visit, group_visits, matches

if TYPE_CHECKING:
    import os
    from types import FrameType

__all__ = ["Collector", "ReceivedRequest", "StoredHit", "serve"]

LOGGER = logging.getLogger("asgi_matomo")

TRACKING_PATHS = frozenset({"/matomo.php", "/piwik.php"})
# Matomo's own transparent 1x1 GIF (core/Tracker/Response.php).
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAAAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
# What Matomo prints for a tracking request without any parameter.
EMPTY_REQUEST_TEXT = (
    b"This resource is part of Matomo. Keep full control of your data with the leading"
    b" free and open source web analytics & conversion optimisation platform.<br>\n"
    b"This file is the endpoint for the Matomo tracking API. If you want to access the"
    b" Matomo UI or use the Reporting API, please use index.php instead.\n"
)
# Matomo hides the reason of a 400 unless debugging is allowed.
ERROR_TEXT = b"<html><body><p>An error occurred while processing the request.</p></body></html>\n"
BLOCKED_MESSAGE = (
    "You are currently not allowed to log in because you had too many failed logins,"
    " try again later."
)
# A hit stamped with `cdt` older than this needs the token (MATOMO.md, `cdt`).
UNAUTHENTICATED_MAX_AGE = 86400.0
# Matomo ignores a `cdt` older than this and records the receive time instead.
MAX_CDT_AGE = 20 * 365 * 86400.0
MAX_URL_LENGTH = 1024
MAX_DIMENSION_LENGTH = 250
MAX_CVAR_LENGTH = 200
MAX_CVAR_SLOTS = 5
# `pf_srv` is stored in an unsigned MEDIUMINT column: larger values are dropped.
MAX_PF_SRV = 16777215
CID_LENGTH = 16
# Failed logins after which Matomo's brute-force protection blocks the peer.
BRUTE_FORCE_LIMIT = 20
MAX_BODY = 32 * 1024 * 1024
DEFAULT_API_LIMIT = 100
# The visits log groups this many of the latest hits and shows this many visits:
# bounded work per refresh, and a page a browser keeps up with.
PAGE_HITS = 1000
PAGE_VISITS = 100
MAX_API_LIMIT = 1000
# A safety net for idle keep-alive connections; stop() closes them anyway.
CONNECTION_TIMEOUT = 60.0
# stop() waits for the accept loop to notice: keep test suites' teardowns short.
POLL_INTERVAL = 0.01
HTTP_STATUS_NAMES = frozenset({"http_status_code", "http_status"})
# A refusal names the served sites, up to this many.
MAX_SITES_SHOWN = 10
# Sites the reporting API lists when every site is served (see _remember_site).
MAX_SEEN_SITES = 1000

# Bounded: int() refuses strings of thousands of digits (ValueError), and no
# number Matomo reads (site ids, slots, counts, times) needs more than 18.
_DIGITS = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_HEX_ID = re.compile(r"[0-9a-fA-F]{16}")
_DIMENSION = re.compile(r"dimension([0-9]{1,18})")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    received REAL NOT NULL,
    idsite INTEGER NOT NULL,
    hit_type TEXT NOT NULL,
    url TEXT,
    action_name TEXT,
    urlref TEXT,
    e_c TEXT,
    e_a TEXT,
    e_n TEXT,
    e_v REAL,
    pf_srv INTEGER,
    search TEXT,
    search_cat TEXT,
    search_count INTEGER,
    cvar TEXT,
    cvar_visit TEXT,
    dimensions TEXT NOT NULL,
    visitor_ip TEXT NOT NULL,
    ua TEXT,
    lang TEXT,
    uid TEXT,
    visitor_id TEXT,
    http_status INTEGER,
    params TEXT NOT NULL
)
"""
_JSON_COLUMNS = frozenset({"cvar", "cvar_visit", "dimensions", "params"})

HitType = Literal["pageview", "event", "search", "download", "outlink", "ping"]
CustomVariables = dict[str, list[str]]


@dataclass(frozen=True)
class StoredHit:
    """One hit as the collector keeps it, with the rules of Matomo applied.

    `time` is the hit time (`cdt` when accepted, else the receive time) as a UTC
    unix timestamp; `params` holds the raw parameters as received, minus
    `token_auth`.
    """

    id: int
    time: float
    received: float
    idsite: int
    hit_type: str
    url: str | None
    action_name: str | None
    urlref: str | None
    e_c: str | None
    e_a: str | None
    e_n: str | None
    e_v: float | None
    pf_srv: int | None
    search: str | None
    search_cat: str | None
    search_count: int | None
    cvar: CustomVariables | None
    cvar_visit: CustomVariables | None
    dimensions: dict[str, str]
    visitor_ip: str
    ua: str | None
    lang: str | None
    uid: str | None
    visitor_id: str | None
    http_status: int | None
    params: dict[str, str]

    @property
    def time_iso(self) -> str:
        """The hit time as `YYYY-MM-DD HH:MM:SS` UTC, the way Matomo shows it."""
        return _format_time(self.time)

    def to_json(self) -> dict[str, Any]:
        """The hit as a JSON-ready dict (what `/api/hits` answers)."""
        data = asdict(self)
        data["time_iso"] = self.time_iso
        return data


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request received at the tracking endpoint and what was answered.

    `status` is 0 when no answer was sent (a dropped connection, or stop() during
    a delay). `elements` is the length of a bulk `requests` list (1 for a single
    hit); `tracked`/`invalid` are counted the way Matomo reports them (with
    `queued_tracking`, which reports none: the hits stored and dropped).
    """

    kind: Literal["single", "bulk"]
    status: int
    tracked: int
    invalid: int
    elements: int
    has_token: bool
    faulted: bool = False


@dataclass
class _Fault:
    status: int | None
    delay: float
    body: bytes | None
    headers: dict[str, str]
    remaining: int | None
    drop: bool


class _InvalidHitError(Exception):
    """Matomo refuses the hit: 400 for a single hit, counted `invalid` in a bulk.

    `kind` names the rule (one of a few fixed names: the console's rate limit is
    per kind); the message says what was wrong and how to fix it.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


# What _faulted() returns when the request is to be handled normally.
_PROCEED = _Answer(0)


@dataclass
class _Auth:
    """The token situation of one tracking request."""

    token: str | None
    blocked: bool


def _format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _truncate(value: str | None, limit: int) -> str | None:
    return None if value is None else value[:limit]


def _nonempty(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    return value if value else None


def _parse_cdt(value: str, now: float) -> float | None:
    """The hit time from `cdt`, or None when Matomo would ignore it."""
    if _DECIMAL.fullmatch(value):
        stamp = float(value)
    else:
        try:
            parsed = datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None
        stamp = parsed.replace(tzinfo=timezone.utc).timestamp()
    # Matomo's isTimestampValid(): not in the future, not absurdly old.
    if stamp > now or stamp < now - MAX_CDT_AGE:
        return None
    return stamp


def _parse_pf_srv(value: str | None) -> int | None:
    # MATOMO.md: 201 stored; 201.5, -1 and > 16777215 silently dropped.
    if value is None or not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if number <= MAX_PF_SRV else None


def _parse_float(value: str | None) -> float | None:
    if value is None or not _DECIMAL.fullmatch(value.strip()):
        return None
    return float(value)


def _cvar_text(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value[:MAX_CVAR_LENGTH]
    if isinstance(value, (int, float)):
        return str(value)[:MAX_CVAR_LENGTH]
    return None


def _parse_cvar(raw: str | None) -> CustomVariables | None:
    """Custom variables in slot format; invalid slots skipped like Matomo does.

    MATOMO.md: `{"1":["name","value"]}`, slots 1..5; other shapes are silently
    dropped (the upstream `{"http_status_code": 200}` has no valid slot at all).
    """
    if not raw:
        return None
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError):  # nested too deep: PHP's json_decode gives up too
        return None
    # A JSON list is a PHP array with keys 0, 1, ...: slot 0 is invalid.
    items: Iterable[tuple[object, object]]
    if isinstance(decoded, dict):
        items = decoded.items()
    elif isinstance(decoded, list):
        items = enumerate(decoded)
    else:
        return None
    slots: CustomVariables = {}
    for key, pair in items:
        slot = str(key)
        if not _DIGITS.fullmatch(slot) or not 1 <= int(slot) <= MAX_CVAR_SLOTS:
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            continue
        name, value = _cvar_text(pair[0]), _cvar_text(pair[1])
        if name is None or value is None:
            continue
        slots[str(int(slot))] = [name, value]
    return slots or None


def _http_status(cvar: CustomVariables | None) -> int | None:
    for name, value in (cvar or {}).values():
        normalized = name.strip().lower().replace(" ", "_").replace("-", "_")
        if normalized in HTTP_STATUS_NAMES and _DIGITS.fullmatch(value):
            return int(value)
    return None


def _dimensions(params: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in params.items():
        match = _DIMENSION.fullmatch(name)
        if match and int(match.group(1)) > 0:
            found[str(int(match.group(1)))] = value[:MAX_DIMENSION_LENGTH]
    return found


def _visitor_ip(cip: str) -> str:
    # Matomo stores an unparsable IP as 0.0.0.0 (IPUtils::stringToBinaryIP).
    try:
        return str(ipaddress.ip_address(cip.strip()))
    except ValueError:
        return "0.0.0.0"  # noqa: S104 - a stored value, not a bind address


def _hit_type(params: Mapping[str, str]) -> HitType:
    if _nonempty(params, "e_c"):
        return "event"
    if _nonempty(params, "search"):
        return "search"
    if _nonempty(params, "download"):
        return "download"
    if _nonempty(params, "link"):
        return "outlink"
    if params.get("ping") == "1":
        return "ping"
    return "pageview"


def _is_recording(params: Mapping[str, str]) -> bool:
    # Matomo reads `rec` as an int: any non-zero number asks to record.
    rec = params.get("rec", "").strip()
    return bool(_DIGITS.fullmatch(rec)) and int(rec) != 0


def _query_params(query: str) -> dict[str, str]:
    # PHP keeps the last value of a repeated name, like dict() does.
    return dict(parse_qsl(query, keep_blank_values=True))


def _element_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def _bulk_element(element: object) -> dict[str, str] | None:
    """The parameters of one bulk element, None when Matomo would skip it."""
    if isinstance(element, str):
        # Matomo takes the query part of the element, as parse_url() sees it.
        _, sep, query = element.partition("?")
        params = _query_params(query.partition("#")[0]) if sep else {}
    elif isinstance(element, dict):
        params = {str(key): _element_value(value) for key, value in element.items()}
    else:
        return None
    return params or None


def _is_bulk(raw: bytes) -> bool:
    # Matomo's isUsingBulkRequest(): strpos() of the quoted key, truthy when > 0.
    return raw.find(b'"requests"') > 0 or raw.find(b"'requests'") > 0


def _row_from_db(row: sqlite3.Row) -> StoredHit:
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    return StoredHit(**values)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "asgi-matomo-collector"
    timeout = CONNECTION_TIMEOUT
    # Headers and body leave in two writes: with Nagle's algorithm the body
    # would wait for the client's delayed ACK (about 40 ms per answer).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.server.collector._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.collector._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The default access log goes to stderr and would print token_auth from
        # a GET query: requests are logged by the collector without queries.
        pass

    def do_GET(self) -> None:
        self.server.collector._handle(self)

    def do_POST(self) -> None:
        self.server.collector._handle(self)


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(): stop() returns only when no
    # request is in flight any more, so a stopped collector stores nothing.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.collector = collector
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # pragma: no cover
        # A client that hangs up mid-request: nothing to report on stderr.
        LOGGER.debug("collector: connection error", exc_info=True)


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
    ) -> None:
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
        self._db = sqlite3.connect(
            ":memory:" if db_path is None else db_path,
            check_same_thread=False,
            isolation_level=None,
        )
        self._db.row_factory = sqlite3.Row
        # A file database: one fsync per checkpoint rather than per hit, and
        # readers (e.g. `sqlite3 hits.sqlite`) do not block the collector.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        weakref.finalize(self, self._db.close)
        self._hit_count: int = self._db.execute("SELECT count(*) FROM hits").fetchone()[0]
        self._requests: list[ReceivedRequest] = []
        self._failed_logins: dict[str, int] = {}
        self._fault: _Fault | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Serve in a background thread; after stop(), serve again on the same port."""
        with self._cond:
            if self._server is not None:
                raise RuntimeError("the collector is already running")
            server = _Server((self._host, self._port), self)
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
            _shutdown_socket(connection)
        server.server_close()
        assert thread is not None
        thread.join()
        LOGGER.debug("collector: stopped")

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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
        """Every stored hit, oldest first."""
        return self._select("SELECT * FROM hits ORDER BY id", ())

    def wait_for_hits(self, count: int, timeout: float = 10.0) -> list[StoredHit]:
        """Block until at least `count` hits are stored; TimeoutError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._hit_count >= count, timeout):
                recent = ", ".join(
                    f"{r.kind} {r.status} tracked={r.tracked} invalid={r.invalid}"
                    for r in self._requests[-5:]
                )
                raise TimeoutError(
                    f"expected at least {count} stored hits within {timeout}s, got"
                    f" {self._hit_count} from {len(self._requests)} tracking requests"
                    f" (last ones: {recent or 'none'})"
                )
        return self.hits()

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every HTTP request received at the tracking endpoint, oldest first."""
        with self._cond:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Block until at least `count` tracking requests were answered."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(
                    f"expected at least {count} tracking requests within {timeout}s,"
                    f" got {len(self._requests)}"
                )
            return list(self._requests)

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
            self._fault = _Fault(status, delay, body, dict(headers or {}), count, drop)

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
        with self._cond:
            rows = self._db.execute(sql, tuple(args)).fetchall()
        return [_row_from_db(row) for row in rows]

    def _store(self, rows: list[dict[str, object]]) -> None:
        if not rows:
            return
        columns = ", ".join(rows[0])
        placeholders = ", ".join("?" for _ in rows[0])
        with self._cond:
            # One transaction per HTTP request, like Matomo's bulk tracking.
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    f"INSERT INTO hits ({columns}) VALUES ({placeholders})",  # noqa: S608
                    [tuple(row.values()) for row in rows],
                )
            self._hit_count += len(rows)
            self._cond.notify_all()

    def _record(self, request: ReceivedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    # -- connections ---------------------------------------------------------

    def _register(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.add(connection)
            stopping = self._stopping.is_set()
        if stopping:  # pragma: no cover - a connection accepted while stop() runs
            _shutdown_socket(connection)

    def _unregister(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)

    # -- HTTP ----------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        body = _read_body(handler)
        if body is None:
            handler.close_connection = True
            self._refusals.refused(
                "size", f"refused a request body over {MAX_BODY} bytes (413): send smaller batches"
            )
            _write(handler, _Answer(413, ERROR_TEXT, "text/html; charset=utf-8"))
            return
        path = split.path
        if path in TRACKING_PATHS:
            answer = self._tracking(handler, split.query, body)
        elif path == "/index.php":
            answer = self._reporting_api(handler, split.query, body)
        elif path in ("/", "/index.html") and handler.command == "GET":
            answer = self._page(split.query)
        elif path == "/visits.html" and handler.command == "GET":
            answer = self._visits_fragment(handler, split.query)
        elif path == "/api/visits" and handler.command == "GET":
            answer = self._api_visits(split.query)
        elif path == "/api/hits" and handler.command == "GET":
            answer = self._api(split.query)
        else:
            answer = _Answer(404, b"Not found\n", "text/plain; charset=utf-8")
        if answer is None:
            handler.close_connection = True
            LOGGER.debug("collector: %s %s -> no answer", handler.command, path)
            return
        # Never the query: it may carry token_auth.
        LOGGER.debug("collector: %s %s -> %d", handler.command, path, answer.status)
        _write(handler, answer)

    def _auth(self, peer: str, tokens: Iterable[str]) -> _Auth:
        """Count failed logins and tell whether the peer is blocked."""
        tokens = [token for token in tokens if token]
        failed = 0
        with self._cond:
            blocked = self._failed_logins.get(peer, 0) >= BRUTE_FORCE_LIMIT
            if not blocked and any(not self._token_is_right(t) for t in tokens):
                failed = self._failed_logins[peer] = self._failed_logins.get(peer, 0) + 1
        if failed:
            self._refusals.refused(
                "token",
                f"a wrong token_auth from {peer}, failed login {failed} of"
                f" {BRUTE_FORCE_LIMIT} before it is blocked: {self._token_fix()}",
            )
        return _Auth(token=tokens[0] if tokens else None, blocked=blocked and bool(tokens))

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

    def _take_fault(self) -> _Fault | None:
        with self._cond:
            fault = self._fault
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
                # Lets a test wait until a faulted request has arrived.
                self._cond.notify_all()
            return fault

    def _tracking(self, handler: _Handler, query: str, body: bytes) -> _Answer | None:
        bulk = handler.command == "POST" and _is_bulk(body)
        fault = self._take_fault()
        if fault is not None:
            answer = self._faulted(handler, fault, query, body, bulk=bulk)
            if answer is not _PROCEED:
                return answer
        if bulk:
            return self._bulk(handler, query, body)
        return self._single(handler, query, body)

    def _faulted(
        self, handler: _Handler, fault: _Fault, query: str, body: bytes, *, bulk: bool
    ) -> _Answer | None:
        """The answer of a faulted request: None for no answer, _PROCEED to handle it."""
        elements, has_token = _shape(query, body, bulk=bulk)

        def record(status: int) -> None:
            kind: Literal["single", "bulk"] = "bulk" if bulk else "single"
            self._record(ReceivedRequest(kind, status, 0, 0, elements, has_token, faulted=True))

        if fault.delay and self._stopping.wait(fault.delay):
            # stop() during the delay: the server went away mid-request.
            record(0)
            return None
        if fault.drop:
            record(0)
            return None
        if fault.status is None:
            if _peer_gone(handler.connection):
                # The client gave up waiting (a timeout): like a request that
                # never reached Matomo, it stores nothing.
                record(0)
                return None
            return _PROCEED
        record(fault.status)
        body = (b"" if fault.status == 204 else ERROR_TEXT) if fault.body is None else fault.body
        content_type: str | None = "text/html; charset=utf-8"
        if any(name.lower() == "content-type" for name in fault.headers):
            content_type = None
        elif body.startswith((b"{", b"[")):
            content_type = "application/json"
        return _Answer(fault.status, body, content_type, fault.headers)

    def _single(self, handler: _Handler, query: str, body: bytes) -> _Answer:
        params = _query_params(query)
        content_type = handler.headers.get("Content-Type", "")
        if handler.command == "POST" and content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            # PHP's $_GET + $_POST: the query wins over the form.
            form = _query_params(body.decode("utf-8", "replace"))
            params = {**form, **params}
        token = params.pop("token_auth", "")
        if not params and not token:
            # Matomo prints its "this is the tracking API" text; a POST without
            # any parameter is a bad request.
            status = 200 if handler.command == "GET" else 400
            if status == 400:
                self._refusals.refused(
                    "empty",
                    "refused a POST without any parameter (400): send the hit as a form"
                    " (application/x-www-form-urlencoded) or in the query string",
                )
            self._record(ReceivedRequest("single", status, 0, int(status != 200), 0, False))
            return _Answer(status, EMPTY_REQUEST_TEXT, "text/html; charset=utf-8")
        auth = self._auth(handler.client_address[0], [token])
        if self._queued and params.get("queuedtracking") != "0":
            send_image = params.get("send_image")
            return self._enqueue(handler, "single", [(0, params, auth.token)], auth, send_image, 1)
        tracked = invalid = 0
        try:
            if auth.blocked:
                raise _InvalidHitError("blocked", _blocked_message(handler.client_address[0]))
            # Matomo checks the site of every request, also of one that records
            # nothing: `?send_image=0` alone is a 400 (MATOMO.md, probes).
            self._check_site(params)
            if _is_recording(params):
                row = self._validate(params, auth.token, handler, time.time())
                self._store([row])
                tracked = 1
        except _InvalidHitError as exc:
            self._refusals.refused(exc.kind, f"refused a hit (400): {exc}")
            invalid = 1
        status = 400 if invalid else 204 if params.get("send_image") == "0" else 200
        self._record(ReceivedRequest("single", status, tracked, invalid, 1, auth.token is not None))
        if invalid:
            return _Answer(400, ERROR_TEXT, "text/html; charset=utf-8")
        if status == 204:
            return _Answer(204)
        return _Answer(200, GIF, "image/gif")

    def _bulk(self, handler: _Handler, query: str, body: bytes) -> _Answer:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # nested too deep is malformed for PHP too
            data = None
        requests = data.get("requests") if isinstance(data, dict) else None
        queued = self._queued and _query_params(query).get("queuedtracking") != "0"
        if not isinstance(data, dict) or not isinstance(requests, list):
            # MATOMO.md: malformed JSON -> 200, nothing tracked, no error.
            self._refusals.refused(
                "bulk",
                "stored nothing from a bulk request whose body is not JSON with a"
                ' "requests" list (Matomo answers success all the same): send'
                ' {"requests": ["?idsite=1&rec=1&...", ...]}',
            )
            self._record(ReceivedRequest("bulk", 200, 0, 0, 0, False))
            if queued:
                handler.close_connection = True
                return _Answer(200, GIF, "image/gif")
            return _json_answer(200, {"status": "success", "tracked": 0, "invalid": 0})
        top_token = data.get("token_auth")
        top_token = top_token if isinstance(top_token, str) and top_token else None
        elements = [_bulk_element(element) for element in requests]
        tokens = [top_token] if top_token else []
        tokens += [p.get("token_auth", "") for p in elements if p and p.get("token_auth")]
        auth = self._auth(handler.client_address[0], tokens)
        has_token = bool(tokens)
        for index, params in enumerate(elements):
            if params is None:
                self._refusals.refused(
                    "element",
                    f"skipped bulk element {index}: it is neither a query string"
                    " ('?idsite=1&rec=1&...') nor an object (Matomo skips it silently)",
                )
        hits = [
            (index, params, params.pop("token_auth", "") or top_token)
            for index, params in enumerate(elements)
            if params is not None
        ]
        send_image = data.get("send_image")
        if queued:
            return self._enqueue(handler, "bulk", hits, auth, send_image, len(requests))
        if auth.blocked:
            self._refusals.refused(
                "blocked",
                f"answered a bulk request 500: {_blocked_message(handler.client_address[0])}",
            )
            self._record(ReceivedRequest("bulk", 500, 0, 0, len(requests), has_token))
            return _json_answer(500, {"status": "error", "message": BLOCKED_MESSAGE})
        now = time.time()
        rows: list[dict[str, object]] = []
        tracked = 0
        invalid_indices: list[int] = []
        for index, params, token in hits:
            try:
                self._check_site(params)
                if not _is_recording(params):
                    # Matomo counts an excluded request as logged and stores nothing.
                    tracked += 1
                    continue
                rows.append(self._validate(params, token, handler, now))
            except _InvalidHitError as exc:
                self._refusals.refused(exc.kind, f"counted bulk element {index} invalid: {exc}")
                invalid_indices.append(index)
            else:
                tracked += 1
        self._store(rows)
        invalid = len(invalid_indices)
        status = 204 if send_image in (0, "0") else 200
        self._record(ReceivedRequest("bulk", status, tracked, invalid, len(requests), has_token))
        if status == 204:
            return _Answer(204)
        answer: dict[str, object] = {"status": "success", "tracked": tracked, "invalid": invalid}
        if self._token_is_right(top_token):
            answer["invalid_indices"] = invalid_indices
        return _json_answer(200, answer)

    def _enqueue(
        self,
        handler: _Handler,
        kind: Literal["single", "bulk"],
        hits: list[tuple[int, dict[str, str], str | None]],
        auth: _Auth,
        send_image: object,
        elements: int,
    ) -> _Answer:
        """What Matomo with the QueuedTracking plugin does (MATOMO.md, QueuedTracking).

        The plugin answers before any hit is validated, closes the connection,
        and checks only the token when it queues the request: a `cip` without
        the right token refuses the whole request, valid hits too. The rest is
        validated when a worker replays the queue, which the sender never hears
        of; here the replay happens at once (the plugin set to process one
        request at a time).
        """
        handler.close_connection = True
        peer = handler.client_address[0]
        refusal: str | None = None
        if auth.blocked:
            refusal = _blocked_message(peer)
        elif any(
            params.get("cip") and not self._token_is_right(token) for _, params, token in hits
        ):
            refusal = (
                "a hit carries cip without the right token_auth, and the plugin checks"
                " it when it queues the request: give the tracker the collector's"
                " --token, or send no cip"
            )
        if refusal is not None:
            self._refusals.refused(
                "queued", f"refused a whole {kind} request (400, nothing queued): {refusal}"
            )
            self._record(ReceivedRequest(kind, 400, 0, len(hits), elements, auth.token is not None))
            return _Answer(400, GIF, "image/gif")
        now = time.time()
        rows: list[dict[str, object]] = []
        dropped = 0
        for _, params, token in hits:
            try:
                self._check_site(params)
                if _is_recording(params):
                    rows.append(self._validate(params, token, handler, now))
            except _InvalidHitError as exc:
                dropped += 1
                self._refusals.refused(
                    exc.kind,
                    f"dropped a queued hit, after answering success (the tracker cannot"
                    f" know): {exc}",
                )
        self._store(rows)
        status = 204 if send_image in (0, "0") else 200
        record = ReceivedRequest(kind, status, len(rows), dropped, elements, auth.token is not None)
        self._record(record)
        return _Answer(204) if status == 204 else _Answer(200, GIF, "image/gif")

    def _check_site(self, params: Mapping[str, str]) -> int:
        """The hit's site id; _InvalidHitError when Matomo has no such site."""
        idsite = params.get("idsite", "").strip()
        if not idsite:
            raise _InvalidHitError(
                "idsite",
                "a hit without idsite (Matomo answers 400, Invalid idSite): send the"
                " site id, e.g. idsite=1 (the middleware's idsite=)",
            )
        if not _DIGITS.fullmatch(idsite) or int(idsite) < 1:
            raise _InvalidHitError(
                "idsite", f"idsite {idsite[:20]!r} is not a site id: send a positive integer"
            )
        site = int(idsite)
        if self._sites is not None and site not in self._sites:
            served = ", ".join(map(str, sorted(self._sites)[:MAX_SITES_SHOWN]))
            if len(self._sites) > MAX_SITES_SHOWN:
                served += ", ..."
            raise _InvalidHitError(
                "idsite",
                f"idsite {site} is not served (sites: {served}): drop --sites to serve"
                f" every site, or add {site} to it",
            )
        self._remember_site(site)
        return site

    def _validate(
        self, params: dict[str, str], token: str | None, handler: _Handler, now: float
    ) -> dict[str, object]:
        """The row Matomo would store for one hit; _InvalidHitError when it refuses it."""
        authorized = self._token_is_right(token)
        idsite = self._check_site(params)
        hit_time = now
        cdt = params.get("cdt", "").strip()
        if cdt:
            stamp = _parse_cdt(cdt, now)
            if stamp is not None:
                if now - stamp >= UNAUTHENTICATED_MAX_AGE and not authorized:
                    raise _InvalidHitError(
                        "cdt",
                        f"cdt {cdt[:30]!r} is older than 24 hours and the hit has"
                        f" {_token_state(token)}: {self._token_fix()}",
                    )
                hit_time = stamp
        cid = params.get("cid", "")
        if cid and len(cid) != CID_LENGTH:
            raise _InvalidHitError(
                "cid",
                f"cid {cid[:40]!r} is not 16 characters: send 16 hex characters, or no cid",
            )
        cip = params.get("cip", "")
        if cip and not authorized:
            raise _InvalidHitError(
                "cip", f"cip with {_token_state(token)}: {self._token_fix()}, or send no cip"
            )
        hit_type = _hit_type(params)
        if hit_type == "event" and not params.get("e_a", "").strip():
            raise _InvalidHitError(
                "event",
                f"an event (e_c={params['e_c'][:40]!r}) without e_a: an event needs an action",
            )
        cvar = _parse_cvar(params.get("cvar"))
        visit_id = _nonempty(params, "_id")
        search_count = params.get("search_count", "")
        url = {"download": "download", "outlink": "link"}.get(hit_type, "url")
        return {
            "time": hit_time,
            "received": now,
            "idsite": idsite,
            "hit_type": hit_type,
            "url": _truncate(_nonempty(params, url), MAX_URL_LENGTH),
            # An event keeps no page title (MATOMO.md: action_name dropped).
            "action_name": _truncate(_nonempty(params, "action_name"), MAX_URL_LENGTH)
            if hit_type == "pageview"
            else None,
            "urlref": _truncate(_nonempty(params, "urlref"), MAX_URL_LENGTH),
            "e_c": _nonempty(params, "e_c") if hit_type == "event" else None,
            "e_a": _nonempty(params, "e_a") if hit_type == "event" else None,
            "e_n": _nonempty(params, "e_n") if hit_type == "event" else None,
            "e_v": _parse_float(params.get("e_v")) if hit_type == "event" else None,
            # pf_srv is kept on page views only (MATOMO.md, Performance).
            "pf_srv": _parse_pf_srv(params.get("pf_srv")) if hit_type == "pageview" else None,
            "search": _nonempty(params, "search") if hit_type == "search" else None,
            "search_cat": _nonempty(params, "search_cat") if hit_type == "search" else None,
            "search_count": int(search_count)
            if hit_type == "search" and _DIGITS.fullmatch(search_count)
            else None,
            "cvar": None if cvar is None else json.dumps(cvar),
            "cvar_visit": _json_or_none(_parse_cvar(params.get("_cvar"))),
            "dimensions": json.dumps(_dimensions(params)),
            "visitor_ip": _visitor_ip(cip) if cip else handler.client_address[0],
            "ua": params.get("ua") or handler.headers.get("User-Agent"),
            "lang": params.get("lang") or handler.headers.get("Accept-Language"),
            "uid": _nonempty(params, "uid"),
            "visitor_id": cid or (visit_id if visit_id and _HEX_ID.fullmatch(visit_id) else None),
            "http_status": _http_status(cvar),
            "params": json.dumps(params),
        }

    def _page_version(self, q: str) -> str:
        """The ETag of the visits list: the page changes only when hits arrive."""
        return f'"{self._page_epoch}-{self._hit_count}-{zlib.crc32(q.encode()):08x}"'

    def _page(self, query: str) -> _Answer:
        nonce = secrets.token_urlsafe(16)
        q = _query_params(query).get("q", "")
        version = self._page_version(q)
        page = render_page(
            self.visits(q=q, last_hits=PAGE_HITS),
            nonce,
            q=q,
            version=version,
            dimension_names=self._dimensions,
            hits_stored=self._hit_count,
            hits_limit=PAGE_HITS,
            visits_limit=PAGE_VISITS,
        )
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
            " connect-src 'self'; base-uri 'none'; form-action 'none'"
        )
        return _Answer(
            200,
            page.encode(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"},
        )

    def _visits_fragment(self, handler: _Handler, query: str) -> _Answer:
        """The page's visits list alone, which its script asks for every second."""
        q = _query_params(query).get("q", "")
        version = self._page_version(q)
        headers = {"Cache-Control": "no-store", "ETag": version}
        if handler.headers.get("If-None-Match") == version:
            # Nothing new: no query, no grouping, no rendering while a page is left open.
            return _Answer(304, headers=headers)
        fragment = render_visits(
            self.visits(q=q, last_hits=PAGE_HITS),
            q=q,
            dimension_names=self._dimensions,
            hits_stored=self._hit_count,
            hits_limit=PAGE_HITS,
            visits_limit=PAGE_VISITS,
        )
        headers["X-Content-Type-Options"] = "nosniff"
        return _Answer(200, fragment.encode(), "text/html; charset=utf-8", headers)

    def _api_visits(self, query: str) -> _Answer:
        params = _query_params(query)
        last_hits = _int_param(params.get("last_hits"), PAGE_HITS)
        if last_hits is None:
            return _json_answer(400, {"error": "last_hits is an integer"})
        visits = self.visits(q=params.get("q", ""), last_hits=max(1, min(last_hits, PAGE_HITS)))
        return _json_answer(200, [visit.to_json() for visit in visits])

    def _api(self, query: str) -> _Answer:
        params = _query_params(query)
        limit = _int_param(params.get("limit"), DEFAULT_API_LIMIT)
        since_id = _int_param(params.get("since_id"), 0)
        if limit is None or since_id is None:
            return _json_answer(400, {"error": "limit and since_id are integers"})
        hits = self.api_hits(
            limit=max(1, min(limit, MAX_API_LIMIT)), q=params.get("q", ""), since_id=since_id
        )
        return _json_answer(200, [hit.to_json() for hit in hits])

    def _reporting_api(self, handler: _Handler, query: str, body: bytes) -> _Answer:
        """Just enough of Matomo's reporting API for `asgi-matomo check`."""
        params = _query_params(query)
        if handler.command == "POST":
            params.update(_query_params(body.decode("utf-8", "replace")))
        if params.get("module") != "API":
            return _Answer(200, b"<html><body>Matomo</body></html>\n", "text/html; charset=utf-8")
        token = params.get("token_auth", "")
        auth = self._auth(handler.client_address[0], [token])
        if auth.blocked:
            return _api_error(BLOCKED_MESSAGE)
        authorized = self._token_is_right(token)
        method = params.get("method", "")
        if method == "SitesManager.getSitesIdWithAdminAccess":
            sites = self._seen_sites if self._sites is None else self._sites
            with self._cond:
                listed = sorted(sites)
            return _json_answer(200, listed if authorized else [])
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
            site = self._check_site({"idsite": id_site})
        except _InvalidHitError:
            site = 0
        if not site:
            return _api_error(
                f"An unexpected website was found in the request: website id was set to"
                f" '{id_site}' ."
            )
        return _json_answer(
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


def _token_state(token: str | None) -> str:
    return "a wrong token_auth" if token else "no token_auth"


def _blocked_message(peer: str) -> str:
    return (
        f"{peer} is blocked after {BRUTE_FORCE_LIMIT} wrong token_auth values, as"
        " Matomo's brute-force protection does: fix the tracker's token, then restart"
        " the collector (Matomo: wait for the block to expire)"
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


def _json_or_none(value: object) -> str | None:
    return None if value is None else json.dumps(value)


def _int_param(value: str | None, default: int) -> int | None:
    if value is None or value == "":
        return default
    return int(value) if _DIGITS.fullmatch(value) else None


def _json_answer(status: int, data: object) -> _Answer:
    return _Answer(status, json.dumps(data).encode(), "application/json")


def _api_error(message: str) -> _Answer:
    # Matomo's reporting API answers errors with HTTP 200.
    return _json_answer(200, {"result": "error", "message": message})


def _shape(query: str, body: bytes, *, bulk: bool) -> tuple[int, bool]:
    """How many elements a tracking request carries and whether it has a token."""
    if not bulk:
        return 1, "token_auth=" in query or b"token_auth=" in body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 0, False
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
        return 0, False
    return len(data["requests"]), b"token_auth" in body


def _peer_gone(connection: socket.socket) -> bool:
    """True when the client closed its side of the connection."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # pragma: no cover - a connection reset by the client
        return True


def _shutdown_socket(connection: socket.socket) -> None:
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _read_body(handler: _Handler) -> bytes | None:
    """The request body, None when it is larger than MAX_BODY."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return _read_chunked(handler)
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY:
        return None
    return handler.rfile.read(length) if length > 0 else b""


def _read_chunked(handler: _Handler) -> bytes | None:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = handler.rfile.readline(1024)
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            # Trailers (usually none) end with an empty line.
            while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # pragma: no cover - HTTP clients send no trailers
            return b"".join(chunks)
        total += size
        if total > MAX_BODY:
            return None
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline(1024)


def _write(handler: _Handler, answer: _Answer) -> None:
    handler.send_response(answer.status)
    if answer.content_type is not None:
        handler.send_header("Content-Type", answer.content_type)
    for name, value in answer.headers.items():
        handler.send_header(name, value)
    # 204 and 304 have no body, nor a length.
    if answer.status not in (204, 304):
        handler.send_header("Content-Length", str(len(answer.body)))
    if handler.close_connection:
        handler.send_header("Connection", "close")
    handler.end_headers()
    if answer.status not in (204, 304):
        handler.wfile.write(answer.body)


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so both stop serve() the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    db_path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    sites: Iterable[int] | None = None,
    *,
    queued_tracking: bool = False,
    ready: Callable[[Collector], None] | None = None,
    dimensions: Mapping[int, str] | None = None,
) -> None:
    """Run a collector until Ctrl-C or SIGTERM.

    ```python
    serve("127.0.0.1", 8765, "hits.sqlite", token="secret", sites=[1, 2])
    ```

    Parameters are those of `Collector`; `ready` is called once it listens.
    """
    collector = Collector(
        host=host,
        port=port,
        db_path=db_path,
        token=token,
        sites=sites,
        queued_tracking=queued_tracking,
        dimensions=dimensions,
    )
    # Never set: serve() returns only on Ctrl-C or SIGTERM.
    forever = threading.Event()
    with _terminate_on_sigterm():
        collector.start()
        try:
            if ready is not None:
                ready(collector)
            forever.wait()  # pragma: no cover - left by an exception only
        except KeyboardInterrupt:
            LOGGER.debug("collector: interrupted")
        finally:
            collector.stop()
