"""Throughput under real HTTP load: hello-world Starlette on uvicorn, with and without tracking.

    .venv/bin/python bench/bench_throughput.py [--duration 10] [--repeat 5] [--plot PNG]

Each repetition starts a fresh uvicorn (1 worker, h11 on asyncio or with `--stack
standard` httptools on uvloop, no access log)
per variant, in a rotating order, warms it up, loads it with `wrk` for
`--duration` seconds, then stops it with SIGTERM (the sender flushes) and
compares the hits the collector stored with the requests the app served.

Variants:
- `bare`: no middleware.
- `matomo`: MatomoMiddleware, defaults, healthy Matomo (the collector).
- `matomo-slow`: Matomo answers every bulk request 2 s late during the whole
  load; `max_queue_size` big enough for the backlog. Matomo recovers before
  shutdown so the backlog can drain; every served request must be stored.
- `matomo-slow-sized`: Matomo 2 s late all the time, including the shutdown
  flush; the sender sized to keep up (batch_size 1000, 16 batches in flight).
- `matomo-2s`: the defaults, Matomo 2 s late all the time (shutdown included),
  stopped with SIGTERM: the adaptive sender must keep up by itself.
- `matomo-serial`: a Matomo whose answer time grows with the load
  (`_common.SerialReceiverProcess`: one bulk request at a time, 3 ms per hit),
  with a spool; stopped with SIGTERM. What it did not store must be in the spool.
- `naive`: the old design, one awaited POST per request (for comparison).
- `matomo-receiver`: `matomo`, sending to a minimal bulk endpoint that only
  counts and acknowledges hits (`_common.ReceiverProcess`) instead of the
  collector, which stores each hit in SQLite and cannot keep up with a fast
  stack on a shared core. Checked against the sender's `sent` count.
- `floor`, `passthrough`: not the library (see `_common`), for comparison.

The app runs pinned to one core, wrk and the collector (its own process) to the
other. Ratios are taken within each repetition, then the median is reported.
Everything listens on 127.0.0.1 only; every step has a deadline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HEADERS,
    HOST,
    NOT_THE_LIBRARY,
    CollectorProcess,
    ReceiverProcess,
    SerialReceiverProcess,
    machine_facts,
    start_uvicorn,
    stop_uvicorn,
)

SLOW_DELAY = 2.0
SERIAL_PER_HIT = 0.003

# wrk prints its own summary; this adds one JSON line we can parse.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "non2xx": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Variant:
    name: str
    app: str
    sender: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.0
    # Whether Matomo stays slow while the app shuts down and flushes.
    slow_at_shutdown: bool = False
    # Send to the minimal receiver instead of the collector.
    receiver: bool = False
    # Send to a Matomo that serves one request at a time, this many seconds per hit.
    serial: float = 0.0
    stop_signal: int = signal.SIGINT
    # Run the app on the library found here (a checkout's src/), not the installed one.
    source: str | None = None


VARIANTS = [
    Variant("bare", "bare"),
    Variant("matomo", "matomo"),
    Variant(
        "matomo-slow",
        "matomo",
        {"max_queue_size": 1_000_000, "shutdown_timeout": 120},
        delay=SLOW_DELAY,
    ),
    Variant(
        "matomo-slow-sized",
        "matomo",
        {
            "batch_size": 1000,
            "max_concurrent_batches": 16,
            "max_queue_size": 1_000_000,
            "shutdown_timeout": 120,
        },
        delay=SLOW_DELAY,
        slow_at_shutdown=True,
    ),
    Variant(
        "matomo-2s", "matomo", delay=SLOW_DELAY, slow_at_shutdown=True, stop_signal=signal.SIGTERM
    ),
    Variant(
        "matomo-serial",
        "matomo",
        {"spool_path": "{tmp}/{run}-spool.sqlite3"},
        serial=SERIAL_PER_HIT,
        stop_signal=signal.SIGTERM,
    ),
    Variant("naive", "naive"),
    Variant("matomo-receiver", "matomo", receiver=True),
    # Not the library: the least any tracking middleware does (see _common.Floor),
    # and the price of one more ASGI layer that does nothing (_common.Passthrough).
    Variant("floor", "floor"),
    Variant("passthrough", "passthrough"),
]
STACKS = {"h11": "h11, asyncio", "standard": "httptools, uvloop"}
DEFAULT_VARIANTS = "bare,matomo,matomo-slow,matomo-slow-sized,naive,floor,passthrough"
# Variants whose hits the collector does not see.
UNSEEN = (*NOT_THE_LIBRARY, "matomo-receiver", "matomo-serial")


@dataclass
class Run:
    variant: str
    repetition: int
    rps: float
    cpu_us: float  # the app process's CPU time per request served during the window
    p50_ms: float
    p99_ms: float
    wrk_errors: int
    served: int
    stored: int
    dropped: int | None
    window_requests: int
    window_hits: int
    backlog_at_end_of_load: int
    shutdown_s: float
    gc_us: float  # garbage collection time per request served, whole server life
    gc_collections: int
    retried: int | None = None  # the sender's retried requests
    spooled_left: int = 0  # hits still in the spool after shutdown
    abandoned: int = 0  # stored by the serial Matomo after the sender gave up waiting
    slowest_ms: int = 0  # the serial Matomo's slowest answer


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: float, connections: int, cpus: str, script: Path) -> dict[str, int]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    command += ["-s", str(script)]
    for name, value in HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    out = subprocess.run(
        [*command, f"http://{HOST}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    line = next(x for x in reversed(out.splitlines()) if x.startswith("{"))
    result: dict[str, int] = json.loads(line)
    return result


def run_once(
    variant: Variant,
    repetition: int,
    collector: CollectorProcess,
    receiver_url: str | None,
    args: argparse.Namespace,
    tmp: Path,
) -> Run:
    url = collector.tracking_url
    if variant.receiver:
        assert receiver_url is not None
        url = receiver_url
    serial = None
    if variant.serial:
        serial = SerialReceiverProcess(variant.serial, cpus=args.load_cpu_list)
        url = serial.tracking_url
    options = {
        k: v.replace("{tmp}", str(tmp)).replace("{run}", f"{variant.name}-{repetition}")
        if isinstance(v, str)
        else v
        for k, v in variant.sender.items()
    }
    counts = serial.counts if serial is not None else collector.counts
    before = counts()
    if variant.delay:
        collector.set_delay(variant.delay)
    try:
        env = {"PYTHONPATH": variant.source} if variant.source else None
        server = start_uvicorn(variant.app, url, options, args.app_cpus, tmp, args.stack, env=env)
        try:
            port = server.port
            warm = wrk(port, args.warmup, args.connections, args.load_cpus, args.script)
            start = counts()
            cpu = cpu_seconds(server.process.pid)
            result = wrk(port, args.duration, args.connections, args.load_cpus, args.script)
            cpu = cpu_seconds(server.process.pid) - cpu
            end = counts()
            if variant.delay and not variant.slow_at_shutdown:
                collector.set_delay(0)
        finally:
            stopping = time.perf_counter()
            data = stop_uvicorn(server, variant.stop_signal)
            shutdown_s = time.perf_counter() - stopping
        after = counts()
    finally:
        collector.set_delay(0)
        if serial is not None:
            serial.stop()
    stats = data["stats"]
    served: int = data["served"]
    seconds = result["duration_us"] / 1e6
    # Served so far (wrk's count: exact but for the few requests in flight) minus
    # what Matomo had stored: the hits waiting in the app when the load stopped.
    backlog = warm["requests"] + result["requests"] - (end["tracked"] - before["tracked"])
    stored = after["tracked"] - before["tracked"]
    if variant.receiver:
        # What the receiver acknowledged, as the sender counted it.
        stored = stats["sent"]
    spooled_left = 0
    spool = options.get("spool_path")
    if isinstance(spool, str) and Path(spool).exists():
        with sqlite3.connect(spool) as db:
            spooled_left = db.execute("SELECT count(*) FROM hits").fetchone()[0]
    return Run(
        variant=variant.name,
        repetition=repetition,
        rps=result["requests"] / seconds,
        cpu_us=cpu / result["requests"] * 1e6,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        wrk_errors=result["socket_errors"] + result["non2xx"],
        served=served,
        stored=stored,
        dropped=None if stats is None else stats["dropped"],
        window_requests=end["requests"] - start["requests"],
        window_hits=end["elements"] - start["elements"],
        backlog_at_end_of_load=0 if variant.name == "bare" or variant.name in UNSEEN else backlog,
        shutdown_s=shutdown_s,
        gc_us=data["gc"]["seconds"] / max(served, 1) * 1e6,
        gc_collections=data["gc"]["collections"],
        retried=None if stats is None else stats["retried"],
        spooled_left=spooled_left,
        abandoned=after.get("abandoned", 0) - before.get("abandoned", 0),
        slowest_ms=after.get("slowest_ms", 0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--stack",
        choices=STACKS,
        default="h11",
        help="uvicorn's HTTP parser and loop: h11 on asyncio, or httptools on uvloop",
    )
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated")
    parser.add_argument(
        "--baseline-src",
        help="a src/ directory of another version of the library (e.g. from git archive): "
        "adds the variants matomo@baseline and matomo-2s@baseline, run on it",
    )
    parser.add_argument("--app-cpus", default="0", help="taskset list for uvicorn ('' = none)")
    parser.add_argument("--load-cpus", default="1", help="taskset list for wrk and collector")
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument(
        "--from-json", type=Path, help="no measuring: report (and plot) the runs of --json"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = [Run(**r) for r in json.loads(args.from_json.read_text())]
        names = sorted(dict.fromkeys(r.variant for r in saved), key=lambda n: n != "bare")
        report_and_plot(saved, names, args)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if os.cpu_count() == 1 or not hasattr(os, "sched_setaffinity"):
        args.app_cpus = args.load_cpus = ""
    wanted = args.variants.split(",")
    known = list(VARIANTS)
    if args.baseline_src:
        source = str(Path(args.baseline_src).resolve())
        known += [
            dataclasses.replace(v, name=f"{v.name}@baseline", source=source)
            for v in VARIANTS
            if v.name in ("matomo", "matomo-2s")
        ]
        wanted += [f"{name}@baseline" for name in ("matomo", "matomo-2s") if name in wanted]
    variants = [v for v in known if v.name in wanted]
    if not variants or variants[0].name != "bare":
        raise SystemExit("--variants must include bare (the ratios are relative to it)")

    runs: list[Run] = []
    load_cpus = [int(c) for c in args.load_cpus.split(",")] if args.load_cpus else None
    args.load_cpu_list = load_cpus
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        args.script = tmp / "report.lua"
        args.script.write_text(WRK_SCRIPT)
        collector = CollectorProcess(cpus=load_cpus)
        receiver = ReceiverProcess(cpus=load_cpus) if any(v.receiver for v in variants) else None
        try:
            for repetition in range(args.repeat):
                shift = repetition % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    receiver_url = None if receiver is None else receiver.tracking_url
                    run = run_once(variant, repetition, collector, receiver_url, args, tmp)
                    print(
                        f"# rep {repetition} {variant.name:18} {run.rps:8.0f} req/s "
                        f"{run.cpu_us:6.1f} us CPU/req (GC {run.gc_us:.1f}) "
                        f"served={run.served} stored={run.stored} dropped={run.dropped} "
                        f"window={run.window_requests}/{run.window_hits} "
                        f"backlog={run.backlog_at_end_of_load} shutdown={run.shutdown_s:.1f}s "
                        f"wrk_errors={run.wrk_errors}",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.append(run)
        finally:
            collector.stop()
            if receiver is not None:
                receiver.stop()
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    report_and_plot(runs, [v.name for v in variants], args)


def report_and_plot(runs: list[Run], names: list[str], args: argparse.Namespace) -> None:
    print_report(runs, names, args)
    if args.plot:
        try:
            plot(runs, names, args.plot)
        except ImportError:
            print("\n(no plot: matplotlib is not installed)", file=sys.stderr)


def ratios(runs: list[Run], name: str) -> list[float]:
    """Throughput of `name` / throughput of bare, within each repetition."""
    bare = {r.repetition: r.rps for r in runs if r.variant == "bare"}
    return [r.rps / bare[r.repetition] for r in runs if r.variant == name]


def cpu_ratios(runs: list[Run], name: str) -> list[float]:
    """CPU per request of bare / of `name`: the throughput ratio on a core of its own."""
    bare = {r.repetition: r.cpu_us for r in runs if r.variant == "bare"}
    return [bare[r.repetition] / r.cpu_us for r in runs if r.variant == name]


def _span(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def print_report(runs: list[Run], names: list[str], args: argparse.Namespace) -> None:
    print(f"Machine: {machine_facts()}\n")
    print(
        f"uvicorn 1 worker ({STACKS[args.stack]}) pinned to CPU {args.app_cpus or '-'}; wrk -t1 "
        f"-c{args.connections} and the collector process pinned to CPU {args.load_cpus or '-'}; "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured per run, "
        f"{args.repeat} repetitions, variants in rotating order. Medians (min..max).\n"
    )
    print(
        "| Variant | req/s | ratio to bare | app CPU µs/request | CPU ratio (bare/variant) "
        "| of which GC µs/request | wrk p50 / p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        mine = [r for r in runs if r.variant == name]
        print(
            f"| {name} | {_span([r.rps for r in mine], ',.0f')} "
            f"| {_span(ratios(runs, name), '.3f')} "
            f"| {_span([r.cpu_us for r in mine], '.1f')} "
            f"| {_span(cpu_ratios(runs, name), '.3f')} "
            f"| {statistics.median(r.gc_us for r in mine):.1f} "
            f"| {statistics.median(r.p50_ms for r in mine):.1f} / "
            f"{statistics.median(r.p99_ms for r in mine):.1f} |"
        )
    print(
        "\n| Variant | served (all runs) | stored by Matomo | left in the spool | lost "
        "| dropped (sender stats) | retried | stored after a timeout (duplicates) "
        "| Matomo requests per 1000 hits during load | backlog when load stopped (max) "
        "| shutdown s (max) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names[1:]:
        if name in NOT_THE_LIBRARY:  # they track nothing
            continue
        mine = [r for r in runs if r.variant == name]
        served = sum(r.served for r in mine)
        stored = sum(r.stored for r in mine)
        window_hits = sum(r.window_hits for r in mine)
        per_1000 = (
            f"{1000 * sum(r.window_requests for r in mine) / window_hits:.2f}"
            if window_hits
            else "-"
        )
        dropped = "-" if mine[0].dropped is None else f"{sum(r.dropped or 0 for r in mine):,}"
        backlog = "-" if name in UNSEEN else f"{max(r.backlog_at_end_of_load for r in mine):,}"
        left = sum(r.spooled_left for r in mine)
        retried = "-" if mine[0].retried is None else f"{sum(r.retried or 0 for r in mine):,}"
        print(
            f"| {name} | {served:,} | {stored:,} | {left:,} | {served - stored - left:,} "
            f"| {dropped} | {retried} | {sum(r.abandoned for r in mine):,} | {per_1000} "
            f"| {backlog} | {max(r.shutdown_s for r in mine):.1f} |"
        )
    if "matomo-serial" in names:
        slowest = max(r.slowest_ms for r in runs if r.variant == "matomo-serial")
        print(
            f"\nmatomo-serial: stored = hits the serial Matomo stored; its slowest answer "
            f"took {slowest / 1000:.2f} s (http_timeout 5 s)."
        )
    if any(name in UNSEEN and name not in NOT_THE_LIBRARY for name in names):
        print(
            "\nmatomo-receiver: stored = hits the minimal receiver acknowledged (the "
            "sender's `sent`); the collector does not see them."
        )


def plot(runs: list[Run], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.38
    colours = {"naive": "#c44e52", "floor": "#999999", "passthrough": "#bbbbbb"}
    for i, name in enumerate(names):
        rps = [r.rps for r in runs if r.variant == name]
        left.bar(i, statistics.median(rps), color=colours.get(name, "#4c72b0"))
        left.scatter([i] * len(rps), rps, color="black", s=8, zorder=3)
        left.annotate(
            f"{statistics.median(rps):,.0f}",
            (i, statistics.median(rps)),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
        for offset, values, hue, label in (
            (-width / 2, ratios(runs, name), "#4c72b0", "req/s ratio (wrk)"),
            (width / 2, cpu_ratios(runs, name), "#8172b2", "CPU-per-request ratio"),
        ):
            median = statistics.median(values)
            right.bar(i + offset, median, width, color=hue, label=None if i else label)
            right.scatter([i + offset] * len(values), values, color="black", s=6, zorder=3)
            right.annotate(
                f"{median:.2f}" if median >= 0.1 else f"{median:.3f}",
                (i + offset, median),
                ha="center",
                va="bottom",
                fontsize=6,
                xytext=(0, 2),
                textcoords="offset points",
            )
    labels = [f"{n}\n(not the library)" if n in NOT_THE_LIBRARY else n for n in names]
    for ax in (left, right):
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("requests/s (bar: median, dots: repetitions)")
    left.set_title("Hello-world Starlette on uvicorn under wrk")
    right.axhline(0.95, color="#55a868", linestyle="--", label="target 0.95")
    right.set_ylabel("relative to bare, same repetition")
    right.set_title("Throughput relative to the bare app")
    right.set_ylim(0, 1.25)
    right.legend(loc="upper right", fontsize=8, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
