"""Instructions per `build_hits` call with overrides, counted by valgrind.

    .venv/bin/python bench/bench_overrides.py [--calls 2000,10000] [--cases plain,documented]

A request whose handler writes overrides (or whose route has `route_details`)
takes the general path of `build_hits`: its overrides are cleaned value by
value and merged, then encoded. This counts what that costs, per call, next to
the plain path (no overrides), the way `bench_instructions.py --steps` counts
the steps of the request path: each case runs under valgrind's cachegrind
(instructions only) with two numbers of calls, and the difference of the two
counts, less the same difference for building the inputs alone, divided by
the difference of the calls, is the cost of one call.

The cases: no overrides; what the documented handler writes
(`PerfMsTracker`'s `pf_srv`, an `action_name`, a custom variable); the same
with `route_details` adding an event (two hits); and awkward values (bytes, a
long text, a cdt out of range). Run it on another tree with
`PYTHONPATH=<that tree>/src` to compare. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CASES = ("setup", "plain", "documented", "route-details", "awkward")
_SUMMARY = re.compile(rb"^summary:\s+(\d+)", re.MULTILINE)
_HEADERS = [
    (b"host", b"shop.example.org"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"accept-language", b"en-US,en;q=0.5"),
    (b"referer", b"https://shop.example.org/"),
]


def overrides_of(case: str) -> dict[str, Any] | None:
    if case in ("setup", "plain"):
        return None
    documented = {"pf_srv": 53, "action_name": "Monthly report", "cvar": {"plan": "pro"}}
    if case == "awkward":
        return {**documented, "uid": b"user-7", "dimension1": "d" * 900, "cdt": 1e300}
    return documented


def run(case: str, calls: int) -> None:
    """The counted program: build `calls` inputs, then (unless `setup`) the hits of each."""
    from asgi_matomo._config import build_config
    from asgi_matomo._core import build_hits
    from asgi_matomo._request import inspect_request

    details = {"/report": {"e_c": "Reports", "e_a": "View"}} if case == "route-details" else None
    config = build_config(
        idsite=1,
        track_visitor_ip=False,
        assume_https=True,
        exclude_paths=None,
        exclude_patterns=None,
        allowed_methods="all-methods",
        ignored_methods=None,
        ignored_user_agents=None,
        route_details=details,
        action_name_from_route=False,
        custom_dimensions=None,
        trusted_proxies=None,
        anonymize_ip_bytes=0,
    )
    infos = []
    for i in range(calls):
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/report",
            "raw_path": b"/report",
            "root_path": "",
            "query_string": b"page=%d" % (i % 50),
            "headers": _HEADERS,
            "client": ("203.0.113.7", 50000),
            "server": ("127.0.0.1", 8000),
            "scheme": "http",
        }
        infos.append(inspect_request(config, scope, 1_700_000_000.0))
    overrides = overrides_of(case)
    if case == "setup":
        return
    for info in infos:
        assert info is not None
        # A fresh dict each time, as each request writes its own.
        build_hits(
            config,
            info,
            status=200,
            elapsed_ms=12.5,
            template=None,
            overrides=dict(overrides) if overrides is not None else None,
            rand=lambda: 42,
        )


def count(case: str, calls: int) -> int:
    directory = Path(tempfile.mkdtemp(prefix="bench-overrides-"))
    out = directory / "cachegrind.out"
    try:
        subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--branch-sim=no",
             f"--cachegrind-out-file={out}",
             sys.executable, __file__, "--case", case, "--calls", str(calls)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            timeout=900,
        )  # fmt: skip
        match = _SUMMARY.search(out.read_bytes())
        if match is None:
            raise RuntimeError(f"no instruction count in {out}")
        return int(match.group(1))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="2000,10000", help="N1,N2: calls per counted run")
    parser.add_argument("--cases", default=",".join(CASES[1:]), help="which cases to count")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one run (internal)
    args = parser.parse_args()
    if args.case is not None:
        run(args.case, int(args.calls))
        return
    low, high = (int(n) for n in args.calls.split(","))
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install -y valgrind)")
    import asgi_matomo

    cases = ["setup", *(case for case in args.cases.split(",") if case != "setup")]
    per_call = {case: (count(case, high) - count(case, low)) / (high - low) for case in cases}
    print(f"asgi_matomo from {Path(asgi_matomo.__file__).parent}, Python {sys.version.split()[0]}")
    print()
    print("| build_hits with | instructions per call |")
    print("|---|---:|")
    for case in cases[1:]:
        print(f"| {case} | {per_call[case] - per_call['setup']:,.0f} |")


if __name__ == "__main__":
    main()
