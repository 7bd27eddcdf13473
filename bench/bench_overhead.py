"""Cost of tracking, in process: added latency per request, sender CPU per hit, queue memory.

    .venv/bin/python bench/bench_overhead.py [--calls 20000] [--rounds 5] [--hits 50000]

1. Added latency: `await app(scope, receive, send)` on a trivial ASGI app, bare
   and wrapped in MatomoMiddleware (sender running in the background, lifespan
   started, pointed at a fast local receiver), interleaved call by call on
   realistic browser scopes. p50/p99 of each, and of the difference, per round.
   Where the time goes: inspect_request, build_hits, submit on their own.
   Then over real HTTP: the hello-world Starlette app under uvicorn, bare and
   with the middleware (two servers up at once, the collector as Matomo), one
   keep-alive connection each, sequential requests alternating between them in
   blocks: no queueing, so the difference is what one request pays, including
   the moments the background sender holds the event loop.
2. Sender CPU per hit: N hits from the real core submitted to a BatchSender
   pointed at a fast receiver in another process; process CPU time of
   encoding + POSTing, divided by N (the submit calls themselves subtracted).
3. Memory per queued hit (tracemalloc): requests through the middleware with a
   sender that never flushes; the ceiling at max_queue_size, and no growth
   when more hits are submitted beyond it.

Only 127.0.0.1 is used; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import statistics
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from typing import Any

from _common import (
    HOST,
    CollectorProcess,
    ReceiverProcess,
    get_page,
    machine_facts,
    percentile,
    pin,
    realistic_scope,
    start_uvicorn,
    stop_uvicorn,
)
from asgi_lifespan import LifespanManager

from asgi_matomo import MatomoMiddleware
from asgi_matomo._bulk import bulk_body
from asgi_matomo._core import build_hits
from asgi_matomo._headers import DIRECT_ORDER, read_headers
from asgi_matomo._hit import Hit
from asgi_matomo._request import inspect_request
from asgi_matomo._routes import route_template
from asgi_matomo._sender import DEFAULT_MAX_QUEUE_SIZE, BatchSender
from asgi_matomo._types import Message, Scope

# The app on CPU 0, the receiver on CPU 1 (when there are two).
BENCH_CPU = [0]
RECEIVER_CPU = [1]
YIELD_EVERY = 100  # calls between two untimed turns of the event loop (the sender's)


async def trivial_app(scope: Scope, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    return None


def fresh(scope: Scope) -> Scope:
    return {**scope, "state": {}}


# -- 1. added latency -------------------------------------------------------------------


async def latency(url: str, calls: int, rounds: int, clock: Callable[[], int]) -> dict[str, Any]:
    middleware = MatomoMiddleware(trivial_app, matomo_url=url, idsite=1, max_queue_size=10 * calls)
    scopes = [realistic_scope(i) for i in range(calls)]
    per_round: list[dict[str, float]] = []
    async with LifespanManager(middleware):
        for _ in range(rounds):
            bare: list[float] = []
            tracked: list[float] = []
            for i, scope in enumerate(scopes):
                first, second = fresh(scope), fresh(scope)
                # Alternate which one goes first, so neither always finds warm caches.
                if i % 2:
                    t0 = clock()
                    await trivial_app(first, receive, send)
                    t1 = clock()
                    await middleware(second, receive, send)
                    t2 = clock()
                    bare.append(t1 - t0)
                    tracked.append(t2 - t1)
                else:
                    t0 = clock()
                    await middleware(second, receive, send)
                    t1 = clock()
                    await trivial_app(first, receive, send)
                    t2 = clock()
                    tracked.append(t1 - t0)
                    bare.append(t2 - t1)
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # untimed: the sender sends here
            diffs = [t - b for t, b in zip(tracked, bare, strict=True)]
            per_round.append(
                {
                    "bare_p50": percentile(bare, 50) / 1000,
                    "bare_p99": percentile(bare, 99) / 1000,
                    "mw_p50": percentile(tracked, 50) / 1000,
                    "mw_p99": percentile(tracked, 99) / 1000,
                    "added_p50": (percentile(tracked, 50) - percentile(bare, 50)) / 1000,
                    "added_p99": (percentile(tracked, 99) - percentile(bare, 99)) / 1000,
                    "diff_p50": percentile(diffs, 50) / 1000,
                    "diff_p99": percentile(diffs, 99) / 1000,
                    "added_mean": (sum(tracked) - sum(bare)) / len(bare) / 1000,
                }
            )
        # Everything submitted was delivered (or is on its way): the sender kept up.
        await middleware._sender.aflush(timeout=30)
    stats = middleware.stats
    return {
        "rounds": per_round,
        "median": {k: statistics.median(r[k] for r in per_round) for k in per_round[0]},
        "sent": stats.sent,
        "submitted": stats.submitted,
        "dropped": stats.dropped,
    }


def breakdown(calls: int) -> dict[str, float]:
    """Mean µs per call of each step of the request path, on its own."""
    middleware = MatomoMiddleware(trivial_app, matomo_url="http://127.0.0.1:9/", idsite=1)
    config = middleware._config
    scopes = [fresh(realistic_scope(i)) for i in range(calls)]
    now = time.time()

    def timed(step: Callable[[], object]) -> float:
        began = time.perf_counter()
        step()
        return (time.perf_counter() - began) / calls * 1e6

    infos: list[Any] = []
    result: dict[str, float] = {}
    result["inspect_request"] = timed(
        lambda: infos.extend(inspect_request(config, s, now) for s in scopes)
    )
    # Its largest part. (Not kept: a list of 20,000 fresh dicts would time the
    # garbage collector too.)
    # What inspect_request reads without a trusted proxy, as configured here.
    result["  of which reading the headers"] = timed(
        lambda: deque((read_headers(s, DIRECT_ORDER) for s in scopes), maxlen=0)
    )
    hits: list[list[Hit]] = []
    result["build_hits"] = timed(
        lambda: hits.extend(
            build_hits(
                config,
                info,
                status=200,
                elapsed_ms=1.5,
                template=route_template(s),
                overrides={},
                rand=lambda: 123456789,
            )
            for info, s in zip(infos, scopes, strict=True)
        )
    )
    # What the sender does with the hits later (per hit).
    flat = [hit for built in hits for hit in built]
    result["sender: encode + bulk body, per hit"] = timed(
        lambda: [
            bulk_body([h.encode(authenticated=False) for h in flat[i : i + 100]], None)
            for i in range(0, len(flat), 100)
        ]
    )
    return result


HTTP_BLOCK = 200  # requests to one server before switching to the next
HTTP_WARMUP = 2000
# name: (create_app variant, MatomoMiddleware options)
HTTP_SERVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "bare": ("bare", {}),
    "matomo": ("matomo", {}),
    # One bulk request per 500 hits instead of 100: does the tail follow the batches?
    "matomo-b500": ("matomo", {"batch_size": 500}),
}


async def http_latency(requests: int, rounds: int, app_cpus: str) -> dict[str, Any]:
    """Sequential requests on one keep-alive connection per server, bare vs middleware."""
    collector = CollectorProcess(cpus=RECEIVER_CPU if app_cpus else None)
    servers = {
        name: start_uvicorn(variant, collector.tracking_url, sender, app_cpus)
        for name, (variant, sender) in HTTP_SERVERS.items()
    }
    per_round: list[dict[str, float]] = []
    try:
        conns = {
            name: await asyncio.open_connection(HOST, server.port)
            for name, server in servers.items()
        }
        for name in conns:
            for _ in range(HTTP_WARMUP):
                await get_page(*conns[name])
        before = collector.counts()
        clock = time.perf_counter_ns
        for _ in range(rounds):
            samples: dict[str, list[float]] = {name: [] for name in conns}
            order = list(conns)
            for _ in range(0, requests, HTTP_BLOCK):
                order.append(order.pop(0))
                for name in order:
                    reader, writer = conns[name]
                    times = samples[name]
                    for _ in range(HTTP_BLOCK):
                        began = clock()
                        await get_page(reader, writer)
                        times.append(clock() - began)
            row: dict[str, float] = {}
            for q in (50, 90, 99, 99.9):
                bare = percentile(samples["bare"], q) / 1000
                for name, times in samples.items():
                    row[f"{name}_p{q:g}"] = percentile(times, q) / 1000
                    row[f"{name}_added_p{q:g}"] = row[f"{name}_p{q:g}"] - bare
            per_round.append(row)
        for _, writer in conns.values():
            writer.close()
    finally:
        for server in servers.values():
            stop_uvicorn(server)
        after = collector.counts()
        collector.stop()
    return {
        "rounds": per_round,
        "median": {k: statistics.median(r[k] for r in per_round) for k in per_round[0]},
        "stored": after["tracked"] - before["tracked"],
        "matomo_requests": after["requests"] - before["requests"],
    }


# -- 2. sender CPU per hit --------------------------------------------------------------


def realistic_hits(n: int) -> list[Hit]:
    """What the middleware queues for n browser requests (its own core builds them)."""
    middleware = MatomoMiddleware(trivial_app, matomo_url="http://127.0.0.1:9/", idsite=1)
    config = middleware._config
    hits: list[Hit] = []
    for i in range(n):
        scope = fresh(realistic_scope(i))
        info = inspect_request(config, scope, time.time())
        assert info is not None
        hits += build_hits(
            config,
            info,
            status=200,
            elapsed_ms=1.5,
            template=None,
            overrides=None,
            rand=lambda: 1234567890,
        )
    return hits


async def sender_cpu(url: str, hits: list[Hit], batch_size: int) -> dict[str, float]:
    n = len(hits)
    # The submit calls alone (request-path cost, measured in part 1): a sender
    # that does not flush during the loop.
    idle = BatchSender(endpoint=url, batch_size=n + 1, flush_interval=3600, max_queue_size=n + 1)
    async with idle.running_in_background():
        began = time.process_time()
        for hit in hits:
            idle.submit(hit)
        submit_cpu = time.process_time() - began
    sender = BatchSender(endpoint=url, batch_size=batch_size, max_queue_size=n + 1)
    async with sender.running_in_background():
        # The HTTP client (its TLS context, its connection) exists before the clock starts.
        sender.submit(hits[0])
        await sender.aflush(timeout=30)
        gc.collect()
        began, wall = time.process_time(), time.perf_counter()
        for i in range(0, n, 1000):
            for hit in hits[i : i + 1000]:
                sender.submit(hit)
            await asyncio.sleep(0)
        delivered = await sender.aflush(timeout=120)
        cpu = time.process_time() - began
        wall = time.perf_counter() - wall
    stats = sender.stats
    assert delivered, stats
    assert stats.sent == n + 1, stats
    # The pure CPU part: encoding the elements and the JSON body.
    began = time.process_time()
    for i in range(0, n, batch_size):
        bulk_body([h.encode(authenticated=False) for h in hits[i : i + batch_size]], None)
    encode_cpu = time.process_time() - began
    return {
        "cpu_us_per_hit": (cpu - submit_cpu) / n * 1e6,
        "encode_us_per_hit": encode_cpu / n * 1e6,
        "submit_us_per_hit": submit_cpu / n * 1e6,
        "hits_per_s_wall": n / wall,
        "batches": stats.batches,
    }


# -- 3. memory ---------------------------------------------------------------------------


async def memory(url: str, queue_size: int) -> dict[str, float]:
    middleware = MatomoMiddleware(
        trivial_app,
        matomo_url=url,
        idsite=1,
        # Never flushes while we measure: every hit stays in the queue.
        batch_size=10 * queue_size,
        flush_interval=3600,
        max_queue_size=queue_size,
    )
    scopes = [realistic_scope(i) for i in range(2 * queue_size)]
    async with LifespanManager(middleware):
        for scope in scopes[:10]:  # first-call allocations out of the picture
            await middleware(fresh(scope), receive, send)
        await middleware._sender.aflush(timeout=30)
        pending = [fresh(scope) for scope in scopes]
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for scope in pending[:queue_size]:
            await middleware(scope, receive, send)
        del pending[:queue_size]
        gc.collect()
        full = tracemalloc.get_traced_memory()[0]
        queued = middleware.stats.queued
        for scope in pending:
            await middleware(scope, receive, send)
        del pending[:]
        gc.collect()
        beyond = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        stats = middleware.stats
    queries = [h.query for h in realistic_hits(100)]
    return {
        "queue_size": queue_size,
        "queued_at_ceiling": queued,
        "bytes_per_hit": (full - base) / queued,
        "ceiling_mb": (full - base) / 2**20,
        "growth_beyond_ceiling_bytes": beyond - full,
        "dropped_beyond": stats.dropped,
        "mean_query_chars": statistics.mean(map(len, queries)),
    }


# -- report -----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    two_cpus = (os.cpu_count() or 1) > 1 and hasattr(os, "sched_setaffinity")
    if two_cpus:
        pin(BENCH_CPU)
    receiver = ReceiverProcess(cpus=RECEIVER_CPU if two_cpus else None)
    try:
        result: dict[str, Any] = {}
        # Wall clock, and this thread's CPU clock: preemption by other processes
        # (a noisy machine) shows in the first only.
        for name, clock in (("wall", time.perf_counter_ns), ("cpu", time.thread_time_ns)):
            result[f"latency_{name}"] = await latency(
                receiver.tracking_url, args.calls, args.rounds, clock
            )
        result["http"] = await http_latency(
            args.http_requests, args.rounds, ",".join(map(str, BENCH_CPU)) if two_cpus else ""
        )
        result["breakdown"] = {
            k: statistics.median(v)
            for k, v in _transpose([breakdown(args.calls) for _ in range(args.rounds)]).items()
        }
        hits = realistic_hits(args.hits)
        result["sender"] = {}
        for batch_size in (100, 500):
            runs = [
                await sender_cpu(receiver.tracking_url, hits, batch_size)
                for _ in range(args.rounds)
            ]
            result["sender"][batch_size] = {
                k: statistics.median(v) for k, v in _transpose(runs).items()
            }
        result["memory"] = await memory(receiver.tracking_url, DEFAULT_MAX_QUEUE_SIZE)
    finally:
        receiver.stop()
    return result


def _transpose(runs: list[dict[str, float]]) -> dict[str, list[float]]:
    return {k: [r[k] for r in runs] for k in runs[0]}


def print_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"Machine: {machine_facts()}\n")
    print(
        f"### 1. Added latency per request (in process, {args.calls:,} interleaved calls "
        f"per round, median of {args.rounds} rounds)\n"
    )
    print("| µs per call | wall p50 | wall p99 | CPU p50 | CPU p99 |")
    print("|---|---:|---:|---:|---:|")
    w, c = result["latency_wall"]["median"], result["latency_cpu"]["median"]
    for label, key in (
        ("trivial app, bare", "bare"),
        ("with MatomoMiddleware", "mw"),
        ("**added** (difference of the percentiles)", "added"),
        ("added (percentile of the paired differences)", "diff"),
    ):
        print(
            f"| {label} | {w[key + '_p50']:.1f} | {w[key + '_p99']:.1f} "
            f"| {c[key + '_p50']:.1f} | {c[key + '_p99']:.1f} |"
        )
    for name in ("wall", "cpu"):
        lat = result[f"latency_{name}"]
        print(
            f"\n{name} clock: mean added {lat['median']['added_mean']:.1f} µs; p99 added per "
            "round: "
            + ", ".join(f"{r['added_p99']:.1f}" for r in lat["rounds"])
            + f" µs; submitted {lat['submitted']:,}, sent {lat['sent']:,}, "
            f"dropped {lat['dropped']:,}."
        )
    print()
    http = result["http"]
    m = http["median"]
    print(
        f"Over HTTP (uvicorn, one keep-alive connection per server, sequential, "
        f"{args.http_requests:,} requests per server per round, blocks of {HTTP_BLOCK} "
        f"alternating; median of {args.rounds} rounds), µs per request:\n"
    )
    print("| server | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | added p99.9 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    quantiles = ("50", "90", "99", "99.9")
    for name, (_, sender) in HTTP_SERVERS.items():
        label = name + (f" ({', '.join(f'{k}={v}' for k, v in sender.items())})" if sender else "")
        print(
            f"| {label} | "
            + " | ".join(f"{m[f'{name}_p{q}']:.0f}" for q in quantiles)
            + " | "
            + " | ".join(
                "-" if name == "bare" else f"**{m[f'{name}_added_p{q}']:.0f}**" for q in quantiles
            )
            + " |"
        )
    print(
        "\np99 added per round (matomo): "
        + ", ".join(f"{r['matomo_added_p99']:.0f}" for r in http["rounds"])
        + f" µs. The collector stored {http['stored']:,} hits in "
        f"{http['matomo_requests']:,} bulk requests during the rounds.\n"
    )
    print(f"Where the time goes (mean µs per request, median of {args.rounds} rounds):\n")
    print("| Step | µs |")
    print("|---|---:|")
    for name, value in result["breakdown"].items():
        print(f"| {name} | {value:.1f} |")
    print(f"\n### 2. Sender CPU per hit ({args.hits:,} hits, fast local receiver)\n")
    print(
        "| batch_size | sender CPU µs/hit (encode + POST) | of which encode + bulk body "
        "| submit µs/hit | delivered hits/s (wall) | HTTP requests |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for batch_size, s in result["sender"].items():
        print(
            f"| {batch_size} | {s['cpu_us_per_hit']:.2f} | {s['encode_us_per_hit']:.2f} "
            f"| {s['submit_us_per_hit']:.2f} | {s['hits_per_s_wall']:,.0f} "
            f"| {s['batches']:.0f} |"
        )
    mem = result["memory"]
    print("\n### 3. Memory of the queue (tracemalloc)\n")
    print("| Measure | Value |")
    print("|---|---:|")
    print(f"| bytes per queued hit (request path included) | {mem['bytes_per_hit']:,.0f} |")
    print(f"| mean length of a hit's query | {mem['mean_query_chars']:.0f} chars |")
    print(
        f"| queue at max_queue_size = {mem['queue_size']:,} "
        f"({mem['queued_at_ceiling']:,} queued) | {mem['ceiling_mb']:.2f} MiB |"
    )
    print(
        f"| growth after {mem['queue_size']:,} more requests (dropped: "
        f"{mem['dropped_beyond']:,}) | {mem['growth_beyond_ceiling_bytes']:,} bytes |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per latency round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hits", type=int, default=50_000, help="hits per sender CPU run")
    parser.add_argument(
        "--http-requests", type=int, default=10_000, help="HTTP requests per server per round"
    )
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    # A full queue logs a (throttled) warning: expected here.
    logging.getLogger("asgi_matomo").setLevel(logging.ERROR)
    result = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_report(result, args)


if __name__ == "__main__":
    main()
