"""Request parsing details the HTTP tests do not reach, and the app's limits in-process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from chatforge.inference.protocol import RequestError, parse_chat_request
from chatforge.inference.server import create_app


def test_request_fields_are_normalised():
    req = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stop": "\n",
            "temperature": 0,
        },
        max_tokens_limit=10,
    )
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert (req.max_tokens, req.stop, req.temperature) == (7, ["\n"], 0.0)
    gen = req.generation_kwargs(default_max_tokens=9)
    assert (gen["max_new_tokens"], gen["fit_context"]) == (7, False)
    omitted = parse_chat_request({"messages": req.messages}, 10).generation_kwargs(default_max_tokens=9)
    assert (omitted["max_new_tokens"], omitted["fit_context"]) == (9, True)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_invalid_fields_name_their_param(payload, param):
    with pytest.raises(RequestError) as err:
        parse_chat_request(payload, max_tokens_limit=10)
    assert (err.value.status, err.value.param) == (400, param)


def test_app_without_key_and_its_queue_limit(chat_model):
    request = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(chat_model)) as client:
        body = client.post("/v1/chat/completions", json=request).json()
        assert body["choices"][0]["message"]["content"] == chat_model.chat(
            request["messages"], max_new_tokens=3, temperature=0
        )
    with TestClient(create_app(chat_model, max_pending=0)) as client:
        busy = client.post("/v1/chat/completions", json=request)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
