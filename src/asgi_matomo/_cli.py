"""The `asgi-matomo` command: a local collector, a check of a real Matomo, the demo."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from asgi_matomo import __version__
from asgi_matomo._check import check
from asgi_matomo._collector import serve
from asgi_matomo._collector._store import DEFAULT_MAX_HITS

if TYPE_CHECKING:
    from asgi_matomo._collector import Collector

__all__ = ["main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_PORT = 65535
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
CONSOLE_TIME_FORMAT = "%H:%M:%S"


def _sites(value: str) -> list[int]:
    try:
        sites = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated site ids like 1,2, got {value!r}"
        ) from None
    if not sites or any(site < 1 for site in sites):
        raise argparse.ArgumentTypeError(f"site ids are positive integers, got {value!r}")
    return sites


def _dimension(value: str) -> tuple[int, str]:
    number, sep, name = value.partition("=")
    try:
        dimension = int(number) if sep and name.strip() else 0
    except ValueError:
        dimension = 0
    if dimension < 1:
        raise argparse.ArgumentTypeError(f"expected ID=NAME like 3=http_status_code, got {value!r}")
    return dimension, name.strip()


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _max_hits(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of hits (0: keep every hit), got {value!r}"
        )
    return number or None


def _port(value: str) -> int:
    # bind() would raise OverflowError, a traceback, for a port out of range.
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to {MAX_PORT}, got {value!r}")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asgi-matomo",
        description="Track every request an ASGI app serves in Matomo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    collector = commands.add_parser(
        "collector",
        help="run a local Matomo stand-in that stores hits and shows them live",
        description="Run a local Matomo stand-in: point a tracker at its /matomo.php"
        " and watch the hits arrive on its page. Stop it with Ctrl-C.",
    )
    collector.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    collector.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port (0: any free)")
    collector.add_argument("--db", help="SQLite file to keep the hits in (default: memory)")
    collector.add_argument("--token", help="the token_auth it accepts (needed for cip)")
    collector.add_argument(
        "--sites",
        type=_sites,
        default=None,
        help="comma-separated site ids it serves; hits for others are refused"
        " (default: every site)",
    )
    collector.add_argument(
        "--queued-tracking",
        action="store_true",
        help="answer like a Matomo with the QueuedTracking plugin: no counts, hits"
        " validated after the answer",
    )
    collector.add_argument(
        "--dimension",
        type=_dimension,
        action="append",
        default=[],
        metavar="ID=NAME",
        help="name a custom dimension on the page, e.g. 3=http_status_code (repeatable)",
    )
    collector.add_argument(
        "--max-hits",
        type=_max_hits,
        default=DEFAULT_MAX_HITS,
        help=f"the most hits kept, in memory or in --db; the oldest go first, still"
        f" counted (default: {DEFAULT_MAX_HITS:,}; 0: keep every hit)",
    )
    collector.set_defaults(handler=_run_collector)

    check = commands.add_parser(
        "check",
        help="check that a Matomo server, site and token are ready (records no visit)",
        description="Check that a Matomo server answers, that the site exists and"
        " that the token may send visitor IPs (cip). Records no visit.",
    )
    check.add_argument(
        "--matomo-url", required=True, help="Matomo's address, with or without /matomo.php"
    )
    check.add_argument("--idsite", type=_positive_int, required=True, help="the site id")
    check.add_argument("--token", help="the token_auth the tracker will use")
    check.set_defaults(handler=_run_check)

    demo = commands.add_parser(
        "demo",
        help="run an instrumented example app with traffic and show what Matomo received",
        description="Start a local Matomo stand-in and an example app under uvicorn"
        " (needs: pip install uvicorn starlette), send it a few dozen realistic requests,"
        " stop it cleanly and print every hit Matomo received.",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the app and the collector running and print the page's address",
    )
    demo.add_argument(
        "--matomo-url", help="send the traffic to this real Matomo instead of the stand-in"
    )
    demo.add_argument(
        "--idsite", type=_positive_int, help="the site id in that Matomo (with --matomo-url)"
    )
    demo.add_argument("--token", help="a token_auth for that site (sends visitor IPs)")
    demo.set_defaults(handler=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `asgi-matomo` command line; returns the exit code."""
    args = _build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


# -- collector -----------------------------------------------------------------


def _run_collector(args: argparse.Namespace) -> int:
    def ready(collector: Collector) -> None:
        sites = "every site" if args.sites is None else ", ".join(map(str, args.sites))
        mode = " (as with QueuedTracking)" if args.queued_tracking else ""
        print(f"asgi-matomo collector: open {collector.base_url}/", flush=True)
        print(f"  tracking URL: {collector.tracking_url}{mode}", flush=True)
        print(f"  sites: {sites}; Ctrl-C stops it.", flush=True)

    # The console is the collector's voice: every refusal is said there, at
    # WARNING, with the reason and the fix (rate-limited by the collector).
    logger = logging.getLogger("asgi_matomo")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT, CONSOLE_TIME_FORMAT))
    console.setLevel(logging.WARNING)
    logger.addHandler(console)
    try:
        serve(
            args.host,
            args.port,
            args.db,
            args.token,
            args.sites,
            queued_tracking=args.queued_tracking,
            ready=ready,
            dimensions=dict(args.dimension),
            max_hits=args.max_hits,
        )
    except sqlite3.Error as exc:
        # A --db that is a directory, or in a folder that does not exist.
        print(f"error: cannot open the hit database {args.db!r}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(console)
    return 0


# -- demo ----------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    # Imported here: the demo's module is only needed by this command.
    from asgi_matomo._demo import run_from_args

    return run_from_args(args)


# -- check ---------------------------------------------------------------------


def _run_check(args: argparse.Namespace) -> int:
    ok = check(args.matomo_url, args.idsite, args.token)
    if ok:
        print("All checks passed.")
        return 0
    print("Some checks failed: see above.", file=sys.stderr)
    return 1
