"""The OpenAI chat-completions wire format: request validation and response bodies (plain dicts, no I/O)."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000
"""Longest stop string: each generated token is checked against every stop string's prefixes."""
MAX_MESSAGES = 4096
MAX_JSON_DEPTH = 32
"""An OpenAI chat body nests about 5 deep; Python's parser would recurse ~1000 deep before failing."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What `torch.Generator.manual_seed` accepts."""
# Parameters whose meaning we cannot honour: rejected rather than silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio")
# Sampling parameters we do not implement: accepted only at their no-op value, which changes nothing.
NO_OP_VALUES = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


class RequestError(Exception):
    """An HTTP error answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A validated POST /v1/chat/completions body."""

    messages: list[dict[str, str]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    include_usage: bool = False
    stop: list[str] | None = None
    seed: int | None = None

    def generation_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        """Options for `ChatModel`; an omitted max_tokens means 'the default, or less to fit the context'."""
        explicit = self.max_tokens is not None
        return {
            "max_new_tokens": self.max_tokens if explicit else default_max_tokens,
            "fit_context": not explicit,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }


def parse_json(body: bytes) -> Any:
    """The body as JSON, refusing (400) what Python's parser accepts but JSON forbids or a server must not
    take: NaN/Infinity and overflowing floats (1e400), nesting deeper than MAX_JSON_DEPTH."""
    if not body:
        raise RequestError(400, "the request body is empty; send a JSON object", code="invalid_json")
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(
            400, f"the request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted",
            code="invalid_json",
        )  # fmt: skip
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit
        raise RequestError(
            400, "the request body holds an integer with too many digits", code="invalid_json"
        ) from exc


_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)]


def json_depth(body: bytes) -> int:
    """Deepest bracket nesting of a JSON text, found without parsing it (strings are skipped)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _reject_constant(name: str) -> float:
    raise RequestError(
        400, f"the request body contains {name}; JSON numbers must be finite", code="invalid_json"
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(
            400, f"the number {text[:40]} overflows a float; JSON numbers must be finite", code="invalid_json"
        )
    return value


def parse_chat_request(payload: Any, max_tokens_limit: int) -> ChatRequest:
    """Check every supported field; raises RequestError(400) naming the offending parameter."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _reject_unsupported(payload)
    model = payload.get("model")
    if model is not None:
        _check_text(model, "model")
    stream = _optional_bool(payload, "stream", False)
    return ChatRequest(
        messages=parse_messages(payload.get("messages")),
        model=model,
        max_tokens=_max_tokens(payload, max_tokens_limit),
        temperature=_number(payload, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(payload, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        stream=stream,
        include_usage=_include_usage(payload, stream),
        stop=_stop(payload.get("stop")),
        seed=_seed(payload),
    )


def parse_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise RequestError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty array of message objects")
    if len(messages) > MAX_MESSAGES:
        raise _invalid("messages", f"has {len(messages)} messages; at most {MAX_MESSAGES} are accepted")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _invalid(param, "must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise _invalid(f"{param}.role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    # OpenAI's newer 'developer' role is what chat templates call 'system'.
    return {
        "role": "system" if role == "developer" else role,
        "content": _content(message.get("content"), param),
    }


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return _check_text(content, f"{param}.content")
    if not isinstance(content, list):
        raise _invalid(f"{param}.content", "must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _invalid(
                f"{param}.content[{j}]", "only text parts {'type': 'text', 'text': str} are supported"
            )
        texts.append(_check_text(part["text"], f"{param}.content[{j}].text"))
    return "".join(texts)


def _check_text(value: Any, param: str) -> str:
    """`value` if it is a string that can be encoded as UTF-8 (JSON's \\ud800 escapes give lone surrogates)."""
    if not isinstance(value, str):
        raise _invalid(param, "must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(param, f"holds an unpaired UTF-16 surrogate at character {exc.start}") from exc
    return value


def _reject_unsupported(payload: dict[str, Any]) -> None:
    n = payload.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError(
            400, "only n=1 is supported (one choice per request)", param="n", code="unsupported_value"
        )
    for key in UNSUPPORTED:
        if payload.get(key) not in (None, False, []):
            raise RequestError(
                400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
            )
    for key, no_op in NO_OP_VALUES.items():
        if payload.get(key, no_op) not in (None, no_op) or isinstance(payload.get(key), bool):
            raise RequestError(
                400, f"'{key}' is not supported by this server (only {json.dumps(no_op)})",
                param=key, code="unsupported_parameter",
            )  # fmt: skip
    fmt = payload.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError(400, "only response_format {'type': 'text'} is supported", param="response_format")


def _max_tokens(payload: dict[str, Any], limit: int) -> int | None:
    # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
    key = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    value = _optional_int(payload, key)
    if value is None:
        return None
    if not 1 <= value <= limit:
        raise _invalid(key, f"must be between 1 and {limit} (this server's limit), got {value}")
    return value


def _include_usage(payload: dict[str, Any], stream: bool) -> bool:
    options = payload.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _invalid("stream_options", "is only allowed when 'stream' is true")
    if not isinstance(options, dict):
        raise _invalid("stream_options", "must be an object")
    return _optional_bool(options, "include_usage", False, param="stream_options.include_usage")


def _stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "must be a non-empty string or an array of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"accepts at most {MAX_STOP_STRINGS} strings")
    for s in stops:
        _check_text(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise _invalid("stop", f"strings may have at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stops


def _seed(payload: dict[str, Any]) -> int | None:
    seed = _optional_int(payload, "seed")
    low, high = SEED_RANGE
    if seed is not None and not low <= seed <= high:
        raise _invalid("seed", f"must fit a 64-bit generator seed ({low}..{high})")
    return seed


def _number(
    payload: dict[str, Any], key: str, default: float, *, low: float, high: float, low_open: bool = False
) -> float:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(key, "must be a number")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(key, f"must be in {bounds}, got {value}")
    return float(value)


def _optional_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _invalid(key, "must be an integer")
    return value


def _optional_bool(payload: dict[str, Any], key: str, default: bool, param: str | None = None) -> bool:
    value = payload.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(param or key, "must be true or false")
    return value


def _invalid(param: str, what: str) -> RequestError:
    return RequestError(400, f"'{param}' {what}", param=param, code="invalid_value")


# --- responses -------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    cid: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")
