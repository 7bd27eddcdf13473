"""Instructions per request under uvicorn, counted by valgrind: a noise-free CPU ratio.

    .venv/bin/python bench/bench_instructions.py [--stacks h11,standard]
        [--variants bare,passthrough,floor,matomo] [--requests 2000,10000]

On a shared machine the CPU time of the same work varies by tens of percent from
minute to minute (other guests on the host), so req/s and CPU µs per request
need many repetitions to show a few percent. Instructions executed do not depend
on the neighbours: each variant's server runs under valgrind's cachegrind (no
cache simulation: it only counts instructions), serves exactly N requests, and is
stopped (Ctrl-C: the sender flushes and closes). Two runs with different N give
the instructions per request, start-up and shutdown cancelling out:

    (instructions(N2) - instructions(N1)) / (N2 - N1)

Instructions are not time (a cache miss costs more than an addition), but for an
interpreter running the same kind of code they track it closely; RESULTS.md
compares this ratio with the measured CPU ratio.

The server is the app of `bench_throughput.py` (`_common.create_app`) with the
same variants; `matomo` sends to a minimal bulk endpoint in another process
(`_common.ReceiverProcess`) and must report every hit sent. The requests come from
`--connections` keep-alive connections carrying a browser's headers, as wrk's.
`PYTHONHASHSEED=0` makes the runs repeatable. Needs valgrind (`apt-get install -y
valgrind`). Only 127.0.0.1 is used; every phase is bounded in time.

`--steps` also counts the parts of the request path in process, the same way
(two runs of N1 and N2 calls each): reading the headers, `inspect_request`,
`build_hits`, what the sender does per hit (encode it, join the bulk body), and
the whole middleware around a trivial ASGI app, on realistic browser scopes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    NOT_THE_LIBRARY,
    ReceiverProcess,
    get_page,
    machine_facts,
    pin,
    start_uvicorn,
    stop_uvicorn,
)

VARIANTS = ("bare", "passthrough", "floor", "matomo")
# Python under cachegrind runs some 30-50 times slower: these bound each phase.
STARTUP_TIMEOUT = 300.0
DRIVE_TIMEOUT = 1800.0
_SUMMARY = re.compile(rb"^summary:\s+(\d+)", re.MULTILINE)
# In-process steps: (what is reported, the mode counted, the mode subtracted).
STEPS = (
    ("reading the headers (no trusted proxy)", "headers", "setup"),
    ("inspect_request (headers included)", "inspect", "setup"),
    ("build_hits", "build", "inspect"),
    ("sender: encode + bulk body, per hit", "encode", "setup"),
    ("the whole middleware, trivial app, sender running", "middleware", "trivial"),
)


def _cachegrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--branch-sim=no",
            f"--cachegrind-out-file={out}"]  # fmt: skip


def _instructions(out: Path) -> int:
    match = _SUMMARY.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction count in {out}")
    return int(match.group(1))


@dataclass
class Count:
    stack: str
    variant: str
    requests: int
    instructions: int
    sent: int | None


async def _drive(port: int, total: int, connections: int) -> int:
    """Send `total` requests over `connections` keep-alive connections; count 200s."""
    tickets = iter(range(total))

    async def connection() -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        answered = 0
        try:
            for _ in tickets:  # shared by every connection: `total` requests in all
                await get_page(reader, writer)
                answered += 1
        finally:
            writer.close()
            await writer.wait_closed()
        return answered

    async with asyncio.timeout(DRIVE_TIMEOUT):
        counts = await asyncio.gather(*(connection() for _ in range(connections)))
    return sum(counts)


def _count(
    stack: str, variant: str, requests: int, connections: int, receiver_url: str, cpus: str
) -> Count:
    directory = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    out = directory / "cachegrind.out"
    wrapper = _cachegrind(out)
    server = start_uvicorn(
        variant,
        receiver_url,
        {},
        cpus,
        directory,
        stack=stack,
        wrapper=wrapper,
        startup_timeout=STARTUP_TIMEOUT,
        env={"PYTHONHASHSEED": "0"},
    )
    try:
        answered = asyncio.run(_drive(server.port, requests, connections))
    finally:
        report = stop_uvicorn(server)
    if answered != requests:
        raise RuntimeError(f"{variant}: {answered} of {requests} requests answered")
    instructions = _instructions(out)
    stats = report.get("stats")
    sent = None if stats is None else int(stats["sent"])
    if variant == "matomo" and sent != requests:
        raise RuntimeError(f"matomo: {sent} hits acknowledged for {requests} requests")
    shutil.rmtree(directory, ignore_errors=True)
    return Count(stack, variant, requests, instructions, sent)


def _run_step(mode: str, calls: int) -> None:
    """One in-process step, `calls` times (run under valgrind by `_count_steps`)."""
    import time

    from _common import realistic_scope
    from bench_overhead import fresh, receive, send, trivial_app

    from asgi_matomo import MatomoMiddleware
    from asgi_matomo._bulk import bulk_body
    from asgi_matomo._core import build_hits
    from asgi_matomo._headers import DIRECT_ORDER, read_headers
    from asgi_matomo._request import inspect_request
    from asgi_matomo._routes import route_template

    # A sender that never sends on its own: the queue is emptied every 100 calls
    # instead, as a running sender would, without counting a POST.
    middleware = MatomoMiddleware(
        trivial_app,
        matomo_url=f"http://{HOST}:9/",
        idsite=1,
        batch_size=10 * calls,
        max_queue_size=10 * calls,
        flush_interval=3600,
    )
    config = middleware._config
    scopes = [fresh(realistic_scope(i % 50)) for i in range(calls)]
    now = time.time()

    def build(scope: Any) -> list[Any]:
        info = inspect_request(config, scope, now)
        assert info is not None
        template = route_template(scope)
        return build_hits(
            config, info, status=200, elapsed_ms=1.5, template=template, overrides={},
            rand=lambda: 123456789,
        )  # fmt: skip

    if mode == "headers":
        for scope in scopes:
            # What inspect_request reads without a trusted proxy, as configured here.
            read_headers(scope, DIRECT_ORDER)
    elif mode == "inspect":
        for scope in scopes:
            inspect_request(config, scope, now)
    elif mode == "build":
        for scope in scopes:
            build(scope)
    elif mode == "encode":
        hits = [hit for scope in scopes[:100] for hit in build(scope)]
        for _ in range(calls // 100):
            bulk_body([h.encode(authenticated=False) for h in hits], None)
    elif mode in ("middleware", "trivial"):
        app: Callable[..., Any] = middleware if mode == "middleware" else trivial_app

        async def serve() -> None:
            sender = middleware._sender
            async with sender.running_in_background():
                for i, scope in enumerate(scopes):
                    await app(scope, receive, send)
                    if i % 100 == 99:
                        sender._queue.clear()

        asyncio.run(serve())
    elif mode != "setup":
        raise ValueError(f"unknown step {mode!r}")


def _count_steps(low: int, high: int) -> list[tuple[str, float]]:
    """Instructions per call of each step: the difference of two counted runs."""
    directory = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    per_call: dict[str, float] = {}
    for mode in sorted({m for _, a, b in STEPS for m in (a, b)}):
        counts = []
        for calls in (low, high):
            out = directory / f"{mode}-{calls}.out"
            command = [*_cachegrind(out), sys.executable, __file__, "--step", mode]
            command += ["--calls", str(calls)]
            subprocess.run(
                command, check=True, capture_output=True, timeout=DRIVE_TIMEOUT,
                env=dict(os.environ, PYTHONHASHSEED="0"),
            )  # fmt: skip
            counts.append(_instructions(out))
        per_call[mode] = (counts[1] - counts[0]) / (high - low)
        print(f"# step {mode:10}: {per_call[mode]:,.0f} instructions per call", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    return [(name, per_call[mode] - per_call[base]) for name, mode, base in STEPS]


def _table(counts: list[Count], stacks: list[str], variants: list[str]) -> str:
    lines = [
        "| Stack | Variant | instructions per request | ratio bare/variant | added per request |",
        "|---|---|---:|---:|---:|",
    ]
    for stack in stacks:
        per_request: dict[str, float] = {}
        for variant in variants:
            runs = sorted(
                (c for c in counts if c.stack == stack and c.variant == variant),
                key=lambda c: c.requests,
            )
            low, high = runs[0], runs[-1]
            per_request[variant] = (high.instructions - low.instructions) / (
                high.requests - low.requests
            )
        bare = per_request.get("bare")
        for variant in variants:
            value = per_request[variant]
            name = f"{variant} (not the library)" if variant in NOT_THE_LIBRARY else variant
            ratio = "-" if bare is None else f"{bare / value:.3f}"
            added = "-" if bare is None else f"{(value - bare) / 1000:+,.1f} k"
            lines.append(f"| {stack} | {name} | {value / 1000:,.1f} k | {ratio} | {added} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stacks",
        default="h11,standard",
        help="h11 (h11, asyncio) and/or standard (httptools, uvloop)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", default="2000,10000", help="N1,N2: requests per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--app-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--json", type=Path, help="write every count here")
    parser.add_argument("--steps", action="store_true", help="also count the steps in process")
    parser.add_argument("--steps-only", action="store_true", help="only count the steps")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one counted step (internal)
    parser.add_argument("--calls", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        _run_step(args.step, args.calls)
        return
    stacks = args.stacks.split(",")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    low, high = (int(n) for n in args.requests.split(","))
    if not 0 < low < high:
        parser.error("--requests: N1,N2 with 0 < N1 < N2")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install -y valgrind")
    pin([int(c) for c in args.load_cpus.split(",")])
    receiver = ReceiverProcess([int(c) for c in args.load_cpus.split(",")])
    counts: list[Count] = []
    try:
        for stack in [] if args.steps_only else stacks:
            for variant in variants:
                for requests in (low, high):
                    count = _count(
                        stack, variant, requests, args.connections, receiver.tracking_url,
                        args.app_cpus,
                    )  # fmt: skip
                    counts.append(count)
                    print(
                        f"# {stack} {variant:12} {requests:6} requests: "
                        f"{count.instructions:,} instructions (sent {count.sent})",
                        flush=True,
                    )
    finally:
        receiver.stop()
    steps = _count_steps(low, high) if args.steps or args.steps_only else []
    if args.json:
        args.json.write_text(
            json.dumps({"servers": [asdict(c) for c in counts], "steps": steps}, indent=1)
        )
    print(f"Machine: {machine_facts()}\n")
    print(
        f"valgrind cachegrind (instruction counts only); per request or call = difference "
        f"of the runs with {high} and {low} of them / {high - low}.\n"
    )
    if counts:
        print(
            f"uvicorn 1 worker pinned to CPU {args.app_cpus}, {args.connections} keep-alive "
            "connections, browser headers.\n"
        )
        print(_table(counts, stacks, variants))
    if steps:
        print("\n| In process (realistic browser scopes) | instructions per call |")
        print("|---|---:|")
        for name, value in steps:
            print(f"| {name} | {value / 1000:,.1f} k |")


if __name__ == "__main__":
    main()
