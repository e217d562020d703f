"""One reply being generated: its token ids in, text deltas and a `Completion` out.

The same object serves a request decoded alone (`ChatModel.stream_chat`) and a row of a batch
(`BatchScheduler`), so both end replies at the same token for the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatforge.config.schema import GenerationConfig
from chatforge.generation import StopStrings

from .text import IncrementalDecoder


@dataclass
class Completion:
    """One finished reply."""

    text: str
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)."""
    prompt_tokens: int
    completion_tokens: int


class ReplyBuilder:
    """Feed it the generated ids one by one with `push`; it says when the reply is `done`.

    A reply ends at EOS, at the token that completes a stop string (checked on the decoded text, as
    `IncrementalDecoder` does, and on the raw text with special tokens, as `StopStrings` does), or after
    `config.max_new_tokens` tokens. The stop token counts in `completion_tokens`, as in `generate`.
    """

    def __init__(self, tokenizer: Any, eos_token_id: int, config: GenerationConfig, prompt_tokens: int):
        self.eos_token_id = eos_token_id
        self.max_new_tokens = config.max_new_tokens
        self.prompt_tokens = prompt_tokens
        self.decoder = IncrementalDecoder(tokenizer, config.stop_strings)
        self.stop_checker = StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
        self.n_tokens = 0
        self.stopped = False
        """True once EOS or a stop string ended the reply."""
        self.done = False

    def push(self, token: int) -> str:
        """Add the next generated id; returns the newly settled text (often empty)."""
        if self.done:
            raise RuntimeError("push() after the reply was done")
        self.n_tokens += 1
        delta = ""
        if token == self.eos_token_id:
            self.stopped = True
        else:
            delta = self.decoder.push(token)
            raw_stop = self.stop_checker is not None and self.stop_checker(self.decoder.ids)
            self.stopped = self.decoder.stopped or raw_stop
        self.done = self.stopped or self.n_tokens >= self.max_new_tokens
        return delta

    def finish(self) -> tuple[str, Completion]:
        """(the held-back rest of the text, the Completion); call once, when done or abandoned early."""
        tail = self.decoder.finish()
        reason = "stop" if self.stopped else "length"
        return tail, Completion(self.decoder.sent, reason, self.prompt_tokens, self.n_tokens)
