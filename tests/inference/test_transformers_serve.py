"""A model dir as chatforge writes it is served as it is by `transformers serve` (the `serve` extra adds
the `openai` package it needs), offline on CPU, and answers what `ChatModel` answers."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .server_process import free_port, running

TRANSFORMERS_CLI = str(Path(sys.executable).parent / "transformers")
HELLO = [{"role": "user", "content": "Hello!"}]

pytestmark = pytest.mark.slow  # ~25 s on 2 cores, mostly `transformers serve` importing its stack


@pytest.fixture(scope="module")
def transformers_server(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [TRANSFORMERS_CLI, "serve", str(chat_model_dir), "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    with running([*cmd, "--device", "cpu"], port, log) as url:
        yield url


def test_transformers_serve_answers_like_chat_model(transformers_server, chat_model_dir, chat_model):
    request = {"model": str(chat_model_dir), "messages": HELLO, "max_tokens": 10, "temperature": 0}
    r = httpx.post(f"{transformers_server}/v1/chat/completions", json=request, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = chat_model.complete(HELLO, temperature=0, max_new_tokens=10)
    assert expected.text.strip()
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert body["usage"]["completion_tokens"] == expected.completion_tokens

    streamed = httpx.post(
        f"{transformers_server}/v1/chat/completions", json={**request, "stream": True}, timeout=120
    )
    events = [e[6:] for e in streamed.text.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]
    chunks = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events]
    assert len(chunks) > 2 and "".join(chunks) == expected.text
