"""What the collector's memory holds per hit kept, and that it stops growing at --max-hits.

    .venv/bin/python bench/bench_collector_memory.py [--max-hits 200000] [--rounds 2]

Real hits first: the demo's app (`asgi_matomo._demo_app`, MatomoMiddleware with
an access token, so the hits carry `cip`) serves the demo's traffic in-process and
sends its hits to a first collector. Then a second collector, in this process,
with `--max-hits`, takes `--rounds` times that many of those hits over HTTP, in
bulk requests of 100 as the sender sends them, and after each step this prints
what the process holds: Python's heap (tracemalloc, the collector's own
structures), SQLite's heap (`sqlite3_memory_used`: the in-memory table and its
page cache) and the resident set size. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import tracemalloc
from pathlib import Path
from urllib.parse import urlencode

import httpx
from _common import machine_facts
from asgi_lifespan import LifespanManager

from asgi_matomo import _demo_app
from asgi_matomo._collector import Collector

TOKEN = "bench-token"  # noqa: S105 - the stand-in's own test token
BULK = 100
MB = 1024 * 1024

_libsqlite = ctypes.CDLL("libsqlite3.so.0")
_libsqlite.sqlite3_memory_used.restype = ctypes.c_int64


def real_hits(requests: int) -> list[dict[str, str]]:
    """The hits the demo's app sends for `requests` requests of the demo's traffic."""
    with Collector(token=TOKEN, max_hits=None) as capture:
        os.environ[_demo_app.ENV_URL] = capture.tracking_url
        os.environ[_demo_app.ENV_IDSITE] = "1"
        os.environ[_demo_app.ENV_TOKEN] = TOKEN
        os.environ.pop(_demo_app.ENV_STATS, None)

        async def drive() -> None:
            app = _demo_app.create_app()
            async with LifespanManager(app):
                # The demo's /fail raises: answered 500, and tracked, like in a server.
                transport = httpx.ASGITransport(
                    app=app, raise_app_exceptions=False, client=(_demo_app.HOST, 40000)
                )
                async with httpx.AsyncClient(transport=transport, base_url="http://a.test") as c:
                    for visit in _demo_app.traffic(requests):
                        await c.get(visit.path, headers=visit.headers)

        asyncio.run(drive())
        return [hit.params for hit in capture.hits()]


def held() -> tuple[float, float, float]:
    """Python heap, SQLite heap, resident set (MB)."""
    gc.collect()
    python = tracemalloc.get_traced_memory()[0] / MB
    sqlite = _libsqlite.sqlite3_memory_used() / MB
    rss = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return python, sqlite, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-hits", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2, help="hits fed: rounds x max-hits")
    parser.add_argument("--requests", type=int, default=1200, help="demo requests to capture")
    args = parser.parse_args()

    hits = real_hits(args.requests)
    sizes = sorted(len(urlencode(hit)) for hit in hits)
    print(f"{len(hits)} real hits captured, {sizes[len(sizes) // 2]} bytes of query each (median)")
    bodies = [
        {"requests": ["?" + urlencode(hit) for hit in hits[i : i + BULK]], "token_auth": TOKEN}
        for i in range(0, len(hits) - BULK + 1, BULK)
    ]
    tracemalloc.start()
    base = held()
    rows = ["| hits fed | kept | Python heap | SQLite heap | RSS |", "|---|---|---|---|---|"]
    steps = [args.max_hits * k // 4 for k in range(1, 4 * args.rounds + 1)]
    with Collector(token=TOKEN, max_hits=args.max_hits) as collector, httpx.Client() as client:
        fed = 0
        for step in steps:
            while fed < step:
                answer = client.post(
                    collector.tracking_url, json=bodies[(fed // BULK) % len(bodies)]
                )
                fed += answer.json()["tracked"]
            totals = collector.totals()
            last = python, sqlite, rss = [
                now - then for now, then in zip(held(), base, strict=True)
            ]
            rows.append(
                f"| {fed:,} | {totals.hits_kept:,} | {python:.1f} MB | {sqlite:.1f} MB"
                f" | {rss:.1f} MB |"
            )
            print(rows[-1], flush=True)
    print()
    print("Growth over the collector's start, in this process:")
    print("\n".join(rows))
    # Python's heap holds the collector's fixed structures (it does not grow with
    # the hits): the cost of a hit kept is SQLite's.
    print(f"\nSQLite heap per hit kept: {last[1] * MB / args.max_hits:.0f} bytes")
    print(machine_facts())


if __name__ == "__main__":
    main()
