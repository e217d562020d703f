"""The terminal chat loop behind `chatforge chat`: one line per user turn, streamed replies, history."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from .chat_model import ChatInputError, ChatModel, Message

HELP = "commands: /reset (forget the conversation), /quit (leave), /help"


def read_lines(stream: TextIO, prompt: str | None) -> Iterator[str]:
    """User lines from `stream`; with a prompt (a terminal) through input(), so line editing works."""
    if prompt is None:
        yield from stream
        return
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def run_repl(
    chat_model: ChatModel,
    lines: Iterable[str],
    out: TextIO,
    err: TextIO,
    *,
    system: str | None = None,
    gen: dict[str, Any] | None = None,
) -> int:
    """Answer each line with the model, keeping the conversation. Replies go to `out` (one per line
    group, ending in a newline); notices go to `err`, so `out` holds only model text when piped."""
    preamble: list[Message] = [{"role": "system", "content": system}] if system else []
    history: list[Message] = []
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            history.clear()
            print("(conversation cleared)", file=err, flush=True)
            continue
        if command == "/help":
            print(HELP, file=err, flush=True)
            continue
        user = {"role": "user", "content": text}
        reply = _answer(chat_model, preamble + history + [user], out, err, gen or {})
        if reply is not None:
            history += [user, {"role": "assistant", "content": reply}]
    return 0


def _answer(
    chat_model: ChatModel, messages: list[Message], out: TextIO, err: TextIO, gen: dict
) -> str | None:
    """Stream one reply to `out`; None when it failed or was interrupted (the turn is then not kept)."""
    try:
        stream = chat_model.stream_chat(messages, **gen)
    except ChatInputError as exc:
        print(f"error: {exc} (/reset starts a new conversation)", file=err, flush=True)
        return None
    parts = []
    try:
        for delta in stream:
            parts.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        print("\n(interrupted)", file=err, flush=True)
        return None
    out.write("\n")
    out.flush()
    return "".join(parts)
