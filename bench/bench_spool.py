"""Throughput of the SQLite spool: put, claim and ack in batches of 100 hits.

    .venv/bin/python bench/bench_spool.py [--hits 20000] [--repeat 5] [--dir DIR]

Prints a Markdown table (median of the repeats) and the machine it ran on. Every
run uses a new spool file in a temporary directory under DIR (default: the system
temporary directory; pass a directory on the disk your app would use).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from asgi_matomo._hit import Hit
from asgi_matomo._spool import SqliteSpool
from asgi_matomo._spool_guard import GuardedSpool

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.synchronize import Barrier

BATCH = 100
HITS = 20_000
REPEAT = 5
WORKERS = 4
# Rows already waiting in the spool after a long outage.
BACKLOG = 100_000
# A realistic page view: what the middleware encodes for one request.
QUERY = (
    "idsite=1&rec=1&apiv=1&send_image=0&url=https%3A%2F%2Fshop.example.com%2Fproducts%2F42"
    "%3Fcolour%3Dblue&action_name=Product%2042&ua=Mozilla%2F5.0%20(X11%3B%20Linux%20x86_64)"
    "%20AppleWebKit%2F537.36%20(KHTML%2C%20like%20Gecko)%20Chrome%2F131.0%20Safari%2F537.36"
    "&lang=en-GB%2Cen%3Bq%3D0.9&urlref=https%3A%2F%2Fwww.example.org%2F&pf_srv=12"
    "&_id=0123456789abcdef&rand={i}"
)


def make_batches(hits: int) -> list[list[Hit]]:
    now = time.time()
    all_hits = [Hit(QUERY.format(i=i), now + i / 1000, "203.0.113.7") for i in range(hits)]
    return [all_hits[i : i + BATCH] for i in range(0, hits, BATCH)]


def one_process(
    path: Path,
    batches: list[list[Hit]],
    *,
    max_rows: int | None = None,
    backlog: int = 0,
    guarded: bool = False,
) -> dict[str, tuple[float, int]]:
    """(seconds, hits) for put, claim and ack through one spool instance.

    Claims and acks alternate batch by batch, as the sender replays. With a
    backlog, that many rows wait in the spool before the timed puts. `guarded`:
    through the `GuardedSpool` the middleware uses (a lock and a stat per call).
    """
    spool: SqliteSpool | GuardedSpool
    spool = GuardedSpool(path) if guarded else SqliteSpool(path, max_rows=max_rows)
    try:
        for batch in make_batches(backlog):
            spool.put(batch)
        put = time.perf_counter()
        for batch in batches:
            spool.put(batch)
        put = time.perf_counter() - put
        claim = ack = 0.0
        claimed = 0
        while True:
            began = time.perf_counter()
            rows = spool.claim(BATCH)
            claimed_at = time.perf_counter()
            claim += claimed_at - began
            if not rows:
                break
            spool.ack([row_id for row_id, _ in rows])
            ack += time.perf_counter() - claimed_at
            claimed += len(rows)
    finally:
        spool.close()
    hits = sum(map(len, batches))
    return {"put": (put, hits), "claim": (claim, claimed), "ack": (ack, claimed)}


def _deliver(path: str, start: Barrier) -> None:
    spool = SqliteSpool(path)
    try:
        start.wait()
        while rows := spool.claim(BATCH):
            spool.ack([row_id for row_id, _ in rows])
    finally:
        spool.close()


def _fill(path: str, start: Barrier, hits: int) -> None:
    spool = SqliteSpool(path)
    try:
        batches = make_batches(hits)
        start.wait()
        for batch in batches:
            spool.put(batch)
    finally:
        spool.close()


def workers(target: Callable[..., None], path: Path, *args: object) -> float:
    """Seconds from the start signal until all worker processes are done."""
    ctx = multiprocessing.get_context("spawn")
    # The workers import and open the spool first: only the work itself is timed.
    start = ctx.Barrier(WORKERS + 1)
    procs = [ctx.Process(target=target, args=(str(path), start, *args)) for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    start.wait()
    began = time.perf_counter()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - began
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a worker failed: {[proc.exitcode for proc in procs]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=HITS)
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    hits: int = args.hits
    batches = make_batches(hits)

    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float, count: int) -> None:
        results.setdefault(name, []).append(count / seconds)

    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for phase, (seconds, count) in one_process(Path(tmp, "a.sqlite3"), batches).items():
                record(f"`{phase}` (1 process)", seconds, count)
            guarded = one_process(Path(tmp, "g.sqlite3"), batches, guarded=True)
            for phase, (seconds, count) in guarded.items():
                record(f"`{phase}` (1 process, as the middleware uses it)", seconds, count)
            capped = one_process(Path(tmp, "b.sqlite3"), batches, max_rows=hits * 2)
            record("`put` with `max_rows` (1 process)", *capped["put"])
            behind = one_process(
                Path(tmp, "c.sqlite3"), batches, max_rows=BACKLOG * 2, backlog=BACKLOG
            )
            for phase, (seconds, count) in behind.items():
                record(
                    f"`{phase}` (1 process, {BACKLOG:,} rows waiting, `max_rows` set)",
                    seconds,
                    count,
                )

            shared = Path(tmp, "d.sqlite3")
            record(
                f"`put` ({WORKERS} processes, one file)",
                workers(_fill, shared, hits),
                hits * WORKERS,
            )
            record(
                f"`claim` + `ack` ({WORKERS} processes, one file)",
                workers(_deliver, shared),
                hits * WORKERS,
            )
            spool = SqliteSpool(shared)
            try:
                assert spool.count() == 0
            finally:
                spool.close()

    fs = _filesystem(args.dir or tempfile.gettempdir())
    print(
        f"SQLite spool throughput, batches of {BATCH} hits, {hits} hits per run, "
        f"median of {args.repeat} runs.\n"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({_cpu()}), {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}; spool on {fs}; WAL, synchronous=NORMAL.\n"
    )
    print("| Operation | hits/s (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, rates in results.items():
        print(
            f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} |"
        )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _filesystem(directory: str) -> str:
    """The filesystem type holding `directory` (Linux), for the record."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return directory
    real = os.path.realpath(directory)
    best = max(
        (m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=None,
    )
    return f"{best[2]} ({directory})" if best else directory


if __name__ == "__main__":
    main()
