"""What the collector's visits log costs per refresh, with its store full.

    .venv/bin/python bench/bench_collector_page.py [--hits 1000] [--visitors 50] [--repeat 21]

Stores `--hits` page views from `--visitors` visitors (three browsers, their own
IPs through `cip`), then times the answers the page asks for: the page itself,
the visits list its script fetches every second (all visits, and filtered), and
the same request when nothing changed (304). Prints a Markdown table (median and
min..max in ms, answer size) and the machine it ran on. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from _common import machine_facts

from asgi_matomo._collector import PAGE_HITS, PAGE_VISITS, Collector

TOKEN = "bench-token"  # noqa: S105 - the stand-in's own test token
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36",
)


def _seed(client: httpx.Client, collector: Collector, hits: int, visitors: int) -> None:
    start = int(time.time()) - hits
    requests = []
    for n in range(hits):
        visitor = n % visitors
        params = {
            "idsite": "1",
            "rec": "1",
            "url": f"https://shop.example/products/{n}?color=red",
            "action_name": f"Products / {n}",
            "ua": USER_AGENTS[visitor % len(USER_AGENTS)],
            "lang": "en-GB,en;q=0.9",
            "cip": f"198.51.{visitor // 256}.{visitor % 256}",
            "cdt": str(start + n),
            "pf_srv": "12",
            "dimension3": "200",
            "cvar": json.dumps({"1": ["http_method", "GET"]}),
        }
        requests.append("?" + str(httpx.QueryParams(params)))
    answer = client.post(collector.tracking_url, json={"requests": requests, "token_auth": TOKEN})
    answer.raise_for_status()
    collector.wait_for_hits(hits)


def _time(client: httpx.Client, url: str, headers: dict[str, str], repeat: int) -> str:
    times = []
    size = 0
    for _ in range(repeat):
        began = time.perf_counter()
        response = client.get(url, headers=headers)
        times.append((time.perf_counter() - began) * 1000)
        size = len(response.content)
    median = statistics.median(times)
    return f"{response.status_code} | {median:.1f} | {min(times):.1f}..{max(times):.1f} | {size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=PAGE_HITS)
    parser.add_argument("--visitors", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    with (
        Collector(token=TOKEN, dimensions={3: "http_status_code"}) as collector,
        httpx.Client(timeout=60) as client,
    ):
        _seed(client, collector, args.hits, args.visitors)
        base = collector.base_url
        # The first answer also loads ua-parser's rules: not what a refresh costs.
        version = client.get(base + "/visits.html").headers["etag"]
        cases = [
            ("page `/`", base + "/", {}),
            ("visits list `/visits.html`", base + "/visits.html", {}),
            ("filtered `/visits.html?q=products/99`", base + "/visits.html?q=products/99", {}),
            ("unchanged (`If-None-Match`)", base + "/visits.html", {"If-None-Match": version}),
        ]
        print(
            f"{args.hits} hits from {args.visitors} visitors; the page groups the last"
            f" {PAGE_HITS} and shows {PAGE_VISITS} visits; {args.repeat} requests each\n"
        )
        print("| request | status | median ms | min..max ms | bytes |")
        print("|---|---|---|---|---|")
        for name, url, headers in cases:
            print(f"| {name} | {_time(client, url, headers, args.repeat)} |")
    print(f"\n{machine_facts()}")


if __name__ == "__main__":
    main()
