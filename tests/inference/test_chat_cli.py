"""`chatforge chat` driven with scripted stdin and a pseudo-terminal: replies, history, /reset, line editing,
hub names."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

SYSTEM = {"role": "system", "content": "Be brief."}


def test_scripted_multi_turn_chat(chat_model_dir, chat_model):
    first, second = "Hello!", "What is 3 + 4?"
    script = f"{first}\n\n{second}\n/reset\n{second}\n/quit\nnever read\n"
    cmd = [
        sys.executable, "-m", "chatforge.cli", "chat", "--model", str(chat_model_dir),
        "--greedy", "--max-new-tokens", "10", "--system", SYSTEM["content"],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(cmd, input=script.encode(), capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr.decode()

    gen = {"temperature": 0.0, "max_new_tokens": 10}
    u1, u2 = {"role": "user", "content": first}, {"role": "user", "content": second}
    r1 = chat_model.chat([SYSTEM, u1], **gen)
    r2 = chat_model.chat([SYSTEM, u1, {"role": "assistant", "content": r1}, u2], **gen)
    r3 = chat_model.chat([SYSTEM, u2], **gen)
    assert r2 != r3, "the test model should answer differently with and without history"
    assert done.stdout.decode() == f"{r1}\n{r2}\n{r3}\n"
    assert "(conversation cleared)" in done.stderr.decode()


def _fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The huggingface_hub cache layout: models--ORG--NAME/{refs/main, snapshots/<rev>/<files>}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return root


def _offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def test_hub_names_load_from_the_local_cache(chat_model_dir, chat_model, tmp_path):
    env = _offline_env(_fake_hub_cache(tmp_path / "hub", "fixture-org/chat-llama", chat_model_dir))
    cmd = [sys.executable, "-m", "chatforge.cli", "chat", "--greedy", "--max-new-tokens", "10", "--model"]
    done = subprocess.run(
        [*cmd, "fixture-org/chat-llama"], input=b"Hello!\n", capture_output=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr.decode()
    expected = chat_model.chat([{"role": "user", "content": "Hello!"}], temperature=0, max_new_tokens=10)
    assert done.stdout.decode() == f"{expected}\n"

    for name, needle in [
        ("fixture-org/missing", "not in the Hugging Face cache"),
        ("runs/ppo/final", "no such model dir"),
    ]:
        failed = subprocess.run([*cmd, name], input=b"", capture_output=True, timeout=120, env=env)
        lines = failed.stderr.decode().strip().splitlines()
        assert failed.returncode == 2 and len(lines) == 1, failed.stderr.decode()
        assert lines[0].startswith(f"chatforge chat: {name}: ") and needle in lines[0], lines[0]


def _read_until(fd: int, needle: bytes, timeout: float = 120) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while needle not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"{needle!r} did not come; got {data!r}")
        data += os.read(fd, 4096)
    return data


def test_up_arrow_recalls_the_previous_line_in_a_terminal(chat_model_dir, chat_model):
    main_fd, child_fd = pty.openpty()
    cmd = [
        sys.executable, "-m", "chatforge.cli", "chat", "--model", str(chat_model_dir),
        "--greedy", "--max-new-tokens", "10",
    ]  # fmt: skip
    env = {**os.environ, "TERM": "xterm", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, close_fds=True)
    os.close(child_fd)
    try:
        _read_until(main_fd, b"> ")
        os.write(main_fd, b"Hello!\r")
        _read_until(main_fd, b"> ")
        os.write(main_fd, b"\x1b[A\r")  # Up arrow, Enter: the previous line again
        second = _read_until(main_fd, b"> ")
        os.write(main_fd, b"/quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main_fd)
    hello = {"role": "user", "content": "Hello!"}
    first = chat_model.chat([hello], temperature=0, max_new_tokens=10)
    again = chat_model.chat(
        [hello, {"role": "assistant", "content": first}, hello], temperature=0, max_new_tokens=10
    )
    typed_escape = {"role": "user", "content": "\x1b[A"}
    assert again != chat_model.chat(
        [hello, {"role": "assistant", "content": first}, typed_escape], temperature=0, max_new_tokens=10
    )
    assert again.replace("\n", "\r\n").encode() in second
    assert b"^[[A" not in second
