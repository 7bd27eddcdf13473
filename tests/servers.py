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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until something accepts connections on the port, or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # polling a condition with a deadline, not timing a result
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


def server_command(kind: str, port: int, extra: Sequence[str]) -> list[str]:
    if kind == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--factory", "tests.apps:from_env",
            "--host", "127.0.0.1", "--port", str(port), *extra,
        ]  # fmt: skip
    if kind.startswith("hypercorn"):
        worker = kind.partition("-")[2] or "asyncio"
        return [
            sys.executable, "-m", "hypercorn", "tests.apps:from_env()",
            "--bind", f"127.0.0.1:{port}", "--worker-class", worker, *extra,
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
) -> Iterator[Server]:
    """Run `app` (module:attribute) under a real server pointed at `matomo_url`."""
    port = free_port()
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
            server_command(kind, port, extra), cwd=ROOT, env=env, stdout=log, stderr=log
        )
    server = Server(process, port, log_path)
    try:
        wait_for_port(port, process, START_TIMEOUT)
        yield server
    except BaseException:
        sys.stderr.write(server.log())
        raise
    finally:
        server.stop()
