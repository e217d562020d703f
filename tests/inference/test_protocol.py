"""Request parsing details the HTTP tests do not reach, and the app's limits in-process."""

from __future__ import annotations

import functools
import json
import logging
import time

import pytest
from fastapi.testclient import TestClient

from chatforge.inference.protocol import (
    MAX_MESSAGES,
    RequestError,
    json_depth,
    parse_chat_request,
    parse_json,
)
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


HI = '[{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        # Python's json accepts these literals; JSON does not, and NaN passes every range check.
        (f'{{"messages": {HI}, "temperature": NaN}}', "invalid_json", None),
        (f'{{"messages": {HI}, "top_p": Infinity}}', "invalid_json", None),
        (f'{{"messages": {HI}, "temperature": -Infinity}}', "invalid_json", None),
        (f'{{"messages": {HI}, "temperature": 1e400}}', "invalid_json", None),  # overflows to inf
        (f'{{"messages": {HI}, "max_tokens": {"9" * 5000}}}', "invalid_json", None),  # int digit limit
        (f'{{"messages": {HI}, "x": {"[" * 40}{"]" * 40}}}', "invalid_json", None),
        (f'{{"messages": {HI}, "x": {"[" * 100_000}{"]" * 100_000}}}', "invalid_json", None),
        (f'{{"messages": {HI}, "seed": {2**80}}}', "invalid_value", "seed"),
        (f'{{"messages": {HI}, "seed": {-(2**63) - 1}}}', "invalid_value", "seed"),
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "invalid_value", "messages[0].content"),
        (
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "invalid_value",
            "messages[0].content[0].text",
        ),
        (f'{{"messages": {HI}, "stop": ["ok", "\\ud800"]}}', "invalid_value", "stop"),
        (f'{{"messages": {HI}, "stop": "{"x" * 1001}"}}', "invalid_value", "stop"),
        (f'{{"messages": {HI}, "model": 5}}', "invalid_value", "model"),
        (json.dumps({"messages": [{"role": "user", "content": ""}] * 4097}), "invalid_value", "messages"),
        (f'{{"messages": {HI}, "presence_penalty": 0.5}}', "unsupported_parameter", "presence_penalty"),
        (f'{{"messages": {HI}, "frequency_penalty": true}}', "unsupported_parameter", "frequency_penalty"),
        (f'{{"messages": {HI}, "logit_bias": {{"5": 100}}}}', "unsupported_parameter", "logit_bias"),
        (f'{{"messages": {HI}, "top_p": -0.5}}', "invalid_value", "top_p"),
        (f'{{"messages": {HI}, "max_tokens": 99999999999999999999}}', "invalid_value", "max_tokens"),
    ],
)
def test_hostile_bodies_get_400_not_500(body, code, param):
    with pytest.raises(RequestError) as err:
        parse_chat_request(parse_json(body.encode()), max_tokens_limit=10)
    assert (err.value.status, err.value.code, err.value.param) == (400, code, param), err.value.message


def test_values_at_the_edges_are_accepted():
    body = {
        "messages": [{"role": "user", "content": "x [ { ] }" * 10}] * MAX_MESSAGES,
        "seed": 2**64 - 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "stop": ["y" * 1000],
        "temperature": 2,
    }
    req = parse_chat_request(parse_json(json.dumps(body).encode()), max_tokens_limit=10)
    assert (req.seed, len(req.messages), req.temperature) == (2**64 - 1, MAX_MESSAGES, 2.0)
    nested = f'{{"messages": {HI}, "response_format": {{"type": "text"}}, "x": {"[" * 30}{"]" * 30}}}'
    assert parse_json(nested.encode())["x"] == functools.reduce(lambda inner, _: [inner], range(29), [])


def test_json_depth_skips_strings():
    assert json_depth(b'{"a": "[[[[{{{{", "b": ["\\"[[[", {"c": []}]}') == 4
    assert json_depth(b"[]") == 1 and json_depth(b'"x"') == 0


def test_an_unexpected_error_is_one_500_and_one_logged_traceback(chat_model, monkeypatch, caplog):
    """Served by uvicorn (in a thread), whose own 'Exception in ASGI application' log would be the second."""
    import threading

    import httpx
    import uvicorn

    from .server_process import free_port

    def broken_prepare(*args, **kwargs):
        raise RuntimeError("boom")

    app = create_app(chat_model)
    monkeypatch.setattr(chat_model, "prepare", broken_prepare)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    request = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3}
    with caplog.at_level(logging.INFO):
        thread.start()
        try:
            while not server.started:
                time.sleep(0.05)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=request, timeout=60)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "boom" in str(tracebacks[0].exc_info[1]), caplog.text
    assert app.state.scheduler.stats.rows == 0
