"""CPU per bulk POST: httpx.AsyncClient against the sender's lean asyncio client.

    .venv/bin/python bench/bench_http.py [--posts 2000] [--rounds 5] [--hits 100]
        [--baseline OLD_HTTP_PY] [--parsers httptools,h11] [--instructions 200,600]

Each round POSTs the same realistic bulk body (`--hits` page views, about 50 KB of
JSON at 100) `--posts` times, one after the other on one keep-alive connection, to
a minimal receiver in another process, first with httpx then with the lean client
(rotating which goes first), the lean client once per answer parser installed
(httptools, h11). Each request is bounded as the sender bounds it
(`anyio.fail_after` around httpx, the lean client's own `timeout=`) and reads
`.text`. Prints the user and system CPU time per POST of
this process (the receiver's CPU is not counted), the median of the rounds.

`--baseline` adds, in the same rounds, the `LeanClient` of another version of
`_http.py` (a file, e.g. `git show a2cc5bb:src/asgi_matomo/_http.py > /tmp/old.py`):
before/after on one noisy machine is only comparable within one run. `--parsers`
picks the answer parsers of the lean client measured (h11 alone, say, where
httptools is installed).

`--instructions N1,N2` counts instead of timing: each client POSTs N1 then N2
times (after the same warm-up), each run in its own process under valgrind's
cachegrind (instruction counts only, no cache simulation), and the difference
divided by N2 - N1 is the instructions per POST of the sending process: the same
on a busy machine as on a quiet one. With h11 among the parsers, it also counts
what the lean client asks of h11 per answer without any I/O ("h11 by itself"):
the floor of the h11 path. Needs valgrind. glibc is told not to copy
with `rep movsb` in those runs: valgrind counts that one instruction once per
byte, which would make the copy of the 50 KB body weigh some 54,000 instructions
(about as much as the rest of a POST on the lean client) for 1-2 µs of CPU; the
vector loop glibc uses instead counts close to its cost.

Only 127.0.0.1 is used; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import anyio
import h11
import httpx

from asgi_matomo._hit import Hit
from asgi_matomo._http import PARSER, LeanClient, LeanResponse
from asgi_matomo._version import __version__

HOST = "127.0.0.1"
HEADERS = {"Content-Type": "application/json"}
CLIENT_HEADERS = {"User-Agent": f"asgi-matomo/{__version__}"}
# A realistic page view: what the middleware encodes for one request.
QUERY = (
    "idsite=1&rec=1&apiv=1&send_image=0&url=https%3A%2F%2Fshop.example.com%2Fproducts%2F42"
    "%3Fcolour%3Dblue&action_name=Product%2042&ua=Mozilla%2F5.0%20(X11%3B%20Linux%20x86_64)"
    "%20AppleWebKit%2F537.36%20(KHTML%2C%20like%20Gecko)%20Chrome%2F131.0%20Safari%2F537.36"
    "&lang=en-GB%2Cen%3Bq%3D0.9&urlref=https%3A%2F%2Fwww.example.org%2F&pf_srv=12"
    "&_id=0123456789abcdef&pv_id=a1B2c3&res=1920x1080&h=14&m=2&s=51&cookie=1&pdf=1&java=0"
    "&dimension1=premium&dimension2=eu-west&cvar=%7B%221%22%3A%5B%22plan%22%2C%22pro%22%5D%7D"
    "&rand={i}"
)
WARM_UP = 50
# Python under cachegrind runs some 30-50 times slower: this bounds each counted run.
COUNT_TIMEOUT = 900.0
# Copies and fills by vector loops, not `rep movsb`/`rep stosb` (see the docstring).
_TUNABLES = (
    "glibc.cpu.x86_rep_movsb_threshold=1000000000:glibc.cpu.x86_rep_stosb_threshold=1000000000"
)
_SUMMARY = re.compile(rb"^summary:\s+(\d+)", re.MULTILINE)
_ANSWER_BODY = b'{"status":"success","tracked":100,"invalid":0}'
# What the receiver answers to every POST.
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_ANSWER_BODY),
    _ANSWER_BODY,
)
H11_ALONE = "h11 by itself"


class _Receiver(asyncio.Protocol):
    """Answers each request like Matomo's bulk API, as cheaply as it can."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            assert self.transport is not None
            self.transport.write(ANSWER)


def _serve(conn: Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Receiver, HOST, 0)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)  # until the parent says stop

    asyncio.run(main())


class _Post(Protocol):
    """One bounded POST, as the sender makes it with this client."""

    async def __call__(self, url: str, content: bytes) -> httpx.Response | LeanResponse: ...


Maker = Callable[[], tuple[_Post, Callable[[], Awaitable[None]]]]


def body(hits: int) -> bytes:
    now = time.time()
    requests = [Hit(QUERY.format(i=i), now).encode(authenticated=False) for i in range(hits)]
    return json.dumps({"requests": requests}, separators=(",", ":")).encode()


def _cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def cpu_per_post(
    make: Maker,
    url: str,
    content: bytes,
    posts: int,
) -> tuple[float, float]:
    """(user, system) CPU seconds per POST, after a warm-up on the same connection.

    System time is mostly the kernel carrying the body over loopback: the same
    for any client, and what a real network card costs too.
    """
    post, close = make()
    try:
        for _ in range(WARM_UP):
            await _one(post, url, content)
        user, system = _cpu()
        for _ in range(posts):
            await _one(post, url, content)
        user_end, system_end = _cpu()
        return (user_end - user) / posts, (system_end - system) / posts
    finally:
        await close()


async def _one(post: _Post, url: str, content: bytes) -> None:
    response = await post(url, content)
    assert response.status_code == 200, response.status_code
    assert '"tracked":' in response.text, response.text


def make_httpx() -> tuple[_Post, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(timeout=5.0, headers=CLIENT_HEADERS)

    async def post(url: str, content: bytes) -> httpx.Response:
        with anyio.fail_after(5.0):
            return await client.post(url, content=content, headers=HEADERS)

    return post, client.aclose


def make_lean(url: str, parser: str = PARSER) -> Maker:
    def make() -> tuple[_Post, Callable[[], Awaitable[None]]]:
        client = LeanClient(url, headers=CLIENT_HEADERS, parser=parser)

        async def post(url: str, content: bytes) -> LeanResponse:
            return await client.post(url, content=content, headers=HEADERS, timeout=5.0)

        return post, client.aclose

    return make


def make_baseline(url: str, path: str) -> Maker:
    spec = importlib.util.spec_from_file_location("baseline_http", path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make() -> tuple[_Post, Callable[[], Awaitable[None]]]:
        client = module.LeanClient(url, headers=CLIENT_HEADERS)

        async def post(url: str, content: bytes) -> LeanResponse:
            response: LeanResponse = await client.post(
                url, content=content, headers=HEADERS, timeout=5.0
            )
            return response

        return post, client.aclose

    return make


def makers(url: str, baseline: str | None, parsers: list[str]) -> dict[str, Maker]:
    """The clients measured, by the name printed."""
    found: dict[str, Maker] = {"httpx": make_httpx}
    if baseline:
        found["lean (baseline)"] = make_baseline(url, baseline)
    for parser in parsers:
        found[f"lean ({parser})"] = make_lean(url, parser)
    return found


def _h11_alone(posts: int) -> None:
    """What the lean client asks of h11 per answer, without the client: the floor of its h11 path.

    A connection, the request it is told of, then the answer's three events
    (the head, the body, its end), as `_http_wire._H11Reader` reads them.
    """
    request = h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"matomo")])
    for _ in range(WARM_UP + posts):
        framer = h11.Connection(h11.CLIENT)
        framer.send(request)
        framer.receive_data(ANSWER)
        while type(framer.next_event()) is not h11.EndOfMessage:
            pass


async def _posts(make: Maker, url: str, content: bytes, posts: int) -> None:
    """The warm-up, then `posts` POSTs: what one counted run does."""
    post, close = make()
    try:
        for _ in range(WARM_UP + posts):
            await _one(post, url, content)
    finally:
        await close()


def _count(name: str, args: argparse.Namespace, url: str, posts: int, directory: Path) -> int:
    """Instructions of one run of `name` making `posts` POSTs, in a process under cachegrind."""
    out = directory / "cachegrind.out"
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--branch-sim=no",
        f"--cachegrind-out-file={out}",
        sys.executable, __file__, "--run", name, "--url", url, "--posts", str(posts),
        "--hits", str(args.hits), "--parsers", ",".join(args.parsers),
    ]  # fmt: skip
    if args.baseline:
        command += ["--baseline", args.baseline]
    subprocess.run(
        command, check=True, capture_output=True, timeout=COUNT_TIMEOUT,
        env=dict(os.environ, PYTHONHASHSEED="0", GLIBC_TUNABLES=_TUNABLES),
    )  # fmt: skip
    match = _SUMMARY.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction count in {out}")
    return int(match.group(1))


def count_instructions(args: argparse.Namespace, url: str, names: list[str]) -> None:
    low, high = (int(n) for n in args.instructions.split(","))
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install -y valgrind")
    directory = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        per_post = {}
        for name in names:
            counts = [_count(name, args, url, posts, directory) for posts in (low, high)]
            per_post[name] = (counts[1] - counts[0]) / (high - low)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"Python {platform.python_version()}, httpx {httpx.__version__}, {platform.machine()}")
    print(f"instructions per POST = (I({high}) - I({low})) / {high - low}, {args.hits} hits")
    reference = per_post.get("lean (baseline)")
    print("| client | instructions per POST | per hit | to the baseline |")
    print("|---|---:|---:|---:|")
    for name, value in per_post.items():
        ratio = "-" if reference is None else f"{value / reference:.2f}"
        print(f"| {name} | {value:,.0f} | {value / args.hits:,.0f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hits", type=int, default=100)
    parser.add_argument("--baseline", help="another _http.py whose LeanClient runs alongside")
    parser.add_argument(
        "--parsers",
        type=lambda text: text.split(","),
        default=["httptools", "h11"] if PARSER == "httptools" else ["h11"],
        help="answer parsers of the lean client measured, comma-separated",
    )
    parser.add_argument("--instructions", metavar="N1,N2", help="count instructions instead")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one counted run (under valgrind)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run == H11_ALONE:
        _h11_alone(args.posts)
        return
    if args.run:
        found = makers(args.url, args.baseline, args.parsers)
        asyncio.run(_posts(found[args.run], args.url, body(args.hits), args.posts))
        return
    parent, child = multiprocessing.Pipe()
    receiver = multiprocessing.Process(target=_serve, args=(child,), daemon=True)
    receiver.start()
    try:
        if not parent.poll(30):
            raise SystemExit("the receiver did not start")
        port = parent.recv()
        url = f"http://{HOST}:{port}/matomo.php"
        content = body(args.hits)
        found = makers(url, args.baseline, args.parsers)
        if args.instructions:
            names = list(found) + ([H11_ALONE] if "h11" in args.parsers else [])
            count_instructions(args, url, names)
            return
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in found}
        for n in range(args.rounds):
            names = list(found)
            order = names[n % len(names) :] + names[: n % len(names)]  # rotating
            for name in order:
                times = asyncio.run(cpu_per_post(found[name], url, content, args.posts))
                results[name].append(times)
    finally:
        parent.send("stop")
        receiver.join(10)
    print(f"Python {platform.python_version()}, httpx {httpx.__version__}, {platform.machine()}")
    print(f"{args.posts} POSTs x {args.rounds} rounds, {len(content)} bytes ({args.hits} hits)")
    print("| client | CPU per POST: user + system (median) | user per hit | user, rounds |")
    print("|---|---:|---:|---|")
    for name, values in results.items():
        user = statistics.median(u for u, _ in values) * 1e6
        system = statistics.median(s for _, s in values) * 1e6
        rounds = ", ".join(f"{u * 1e6:.0f}" for u, _ in values)
        print(f"| {name} | {user:.0f} + {system:.0f} µs | {user / args.hits:.2f} µs | {rounds} |")


if __name__ == "__main__":
    main()
