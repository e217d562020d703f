"""`chatforge serve` limits on slow and many clients, on a real process without an API key."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .server_process import chatforge_serve, free_port, running

BODY_TIMEOUT = 1.5
MAX_CONNECTIONS = 4
REQUEST = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-limits") / "server.log"


@pytest.fixture(scope="module")
def server(chat_model_dir: Path, server_log: Path) -> Iterator[str]:
    port = free_port()
    cmd = chatforge_serve(
        chat_model_dir, port, "--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)
    )
    env = {k: v for k, v in os.environ.items() if k != "CHATFORGE_API_KEY"}
    with running(cmd, port, server_log, env=env) as url:
        yield url


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_without_a_key_the_server_is_open_and_says_so(server, server_log):
    assert "no API key" in server_log.read_text()
    assert httpx.post(f"{server}/v1/chat/completions", json=REQUEST, timeout=60).status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_one_log_line(server, server_log):
    before = server_log.read_text()
    with socket.create_connection(_address(server)) as sock:
        sock.settimeout(BODY_TIMEOUT + 10)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
        started = time.monotonic()
        sock.sendall(head + b'{"messages": ')  # ... and the rest never comes
        response = _read_response(sock)  # the server answers, then closes the connection
        waited = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert b'"code":"request_timeout"' in response and b"connection: close" in response.lower()
    assert BODY_TIMEOUT <= waited < BODY_TIMEOUT + 5
    new_lines = server_log.read_text()[len(before) :].strip().splitlines()
    assert len(new_lines) == 1 and "408" in new_lines[0] and "did not arrive within" in new_lines[0]


def test_connections_beyond_the_limit_get_503(server):
    idle = [socket.create_connection(_address(server)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        assert httpx.post(f"{server}/v1/chat/completions", json=REQUEST, timeout=60).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.post(f"{server}/v1/chat/completions", json=REQUEST, timeout=60).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_place_in_the_batch(server, stream):
    before = httpx.get(f"{server}/stats", timeout=10).json()
    body = json.dumps({**REQUEST, "max_tokens": 480, "stream": stream}).encode()
    with socket.create_connection(_address(server)) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        time.sleep(0.3)  # generating (480 tokens take seconds here); then the client leaves
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server}/stats", timeout=10).json()
        if stats["in_flight"] == 0 and stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["in_flight"] == 0, stats
    assert stats["rows"] == before["rows"] + 1
