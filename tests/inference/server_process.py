"""Start an HTTP server as a real process on a free local port and wait until it answers /health."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy in {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def running(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `cmd` (which must listen on 127.0.0.1:`port`), yield its URL, stop it afterwards."""
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env or os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chatforge_serve(model: str | Path, port: int, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "chatforge.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        *options,
    ]
