"""`chatforge serve` refuses bad settings with one line and exit code 2, before loading any model.

The model given is a dir that does not exist: had the command loaded it first, its error would be about the
model, not about the setting under test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from .server_process import free_port

MISSING_MODEL = "/nonexistent/chatforge-model"


def _serve(*options: str, env_key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CHATFORGE_API_KEY"}
    if env_key is not None:
        env["CHATFORGE_API_KEY"] = env_key
    cmd = [sys.executable, "-m", "chatforge.cli", "serve", "--model", MISSING_MODEL, *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatforge serve: "), done.stderr
    assert "Traceback" not in done.stderr and MISSING_MODEL not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_an_empty_api_key_is_refused(key):
    _one_line_error(_serve("--port", str(free_port()), "--api-key", key), "--api-key is empty")


@pytest.mark.parametrize("key", ["", " "])
def test_an_empty_api_key_variable_is_refused(key):
    _one_line_error(_serve("--port", str(free_port()), env_key=key), "CHATFORGE_API_KEY is empty")


def test_a_key_with_surrounding_spaces_is_refused():
    _one_line_error(_serve("--port", str(free_port()), "--api-key", " k3y "), "whitespace")


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_ports_out_of_range_are_refused(port):
    _one_line_error(_serve("--port", port), "--port must be between 1 and 65535", port)


def test_a_port_in_use_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line_error(_serve("--port", str(port)), f"cannot listen on 127.0.0.1:{port}", "--port")


def test_a_host_that_cannot_be_bound_is_refused():
    # 203.0.113.0/24 is TEST-NET-3: no machine has it.
    _one_line_error(
        _serve("--host", "203.0.113.7", "--port", str(free_port())), "cannot listen on 203.0.113.7"
    )


@pytest.mark.parametrize(
    ("option", "value"), [("--max-batch-size", "0"), ("--body-timeout", "0"), ("--max-connections", "-3")]
)
def test_limits_must_be_positive(option, value):
    _one_line_error(_serve("--port", str(free_port()), option, value), option)


def test_with_good_settings_the_model_is_what_fails():
    line = _one_line_error_about_model(_serve("--port", str(free_port()), "--api-key", "k"))
    assert "no such model dir" in line


def _one_line_error_about_model(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and MISSING_MODEL in lines[0], done.stderr
    return lines[0]
