"""Real ASGI servers on loopback, run as subprocesses the way users run them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], timeout: float, host: str = "127.0.0.1"
) -> None:
    """Block until something accepts connections on the port, or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)  # polling a condition with a deadline, not timing a result
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it to exit; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def server_command(
    kind: str, port: int, extra: Sequence[str], host: str = "127.0.0.1"
) -> list[str]:
    """The command line for `kind`: uvicorn, hypercorn[-asyncio|-trio], granian, gunicorn."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if kind == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--factory", "tests.apps:from_env",
            "--host", host, "--port", str(port), *extra,
        ]  # fmt: skip
    if kind.startswith("hypercorn"):
        worker = kind.partition("-")[2] or "asyncio"
        return [
            sys.executable, "-m", "hypercorn", "tests.apps:from_env()",
            "--bind", bind, "--worker-class", worker, *extra,
        ]  # fmt: skip
    if kind == "granian":
        return [
            sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
            "--host", host, "--port", str(port), *extra, "tests.apps:from_env",
        ]  # fmt: skip
    if kind == "gunicorn":
        # The uvicorn-worker package is the maintained home of uvicorn's worker class.
        return [
            sys.executable, "-m", "gunicorn", "--worker-class", "uvicorn_worker.UvicornWorker",
            "--bind", bind, "--no-control-socket", *extra, "tests.apps:from_env()",
        ]  # fmt: skip
    raise ValueError(f"unknown server kind {kind!r}")


@contextlib.contextmanager
def serve(
    app: str,
    matomo_url: str,
    tmp_path: Path,
    *,
    kind: str = "uvicorn",
    options: dict[str, Any] | None = None,
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Iterator[Server]:
    """Run `app` (module:attribute) under a real server pointed at `matomo_url`."""
    port = free_port(host)
    log_path = tmp_path / f"{kind}-{port}.log"
    env = {
        **os.environ,
        "ASGI_MATOMO_APP": app,
        "ASGI_MATOMO_URL": matomo_url,
        "ASGI_MATOMO_OPTIONS": json.dumps(options or {}),
        "PYTHONPATH": str(ROOT),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            server_command(kind, port, extra, host), cwd=ROOT, env=env, stdout=log, stderr=log
        )
    server = Server(process, port, log_path, host)
    try:
        wait_for_port(port, process, START_TIMEOUT, host)
        yield server
    except BaseException:
        sys.stderr.write(server.log())
        raise
    finally:
        server.stop()
