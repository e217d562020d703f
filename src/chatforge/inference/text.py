"""Token ids -> text for streaming: deltas that are safe for multi-byte characters and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, None if none occurs."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string (OpenAI leaves the stop string out), and whether one hit."""
    cut = find_stop(text, stop)
    return (text, False) if cut is None else (text[:cut], True)


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


class IncrementalDecoder:
    """Turns generated token ids, pushed one by one, into text deltas.

    It decodes the whole reply at each step and releases only the settled part: a byte-level BPE token can
    hold half of a UTF-8 character (decoded as U+FFFD until the next token completes it), and a stop string
    can span several tokens, so text that may still change or be cut is held back until it is certain.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        """True once the reply contains a stop string (generation should end)."""

    def decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly settled text (often empty)."""
        self.ids.append(int(token_id))
        text = self.decode()
        cut = find_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        settled = text.rstrip(REPLACEMENT_CHAR)
        settled = settled[: len(settled) - _stop_prefix_len(settled, self.stop)]
        return self._release(settled)

    def finish(self) -> str:
        """The held-back rest once generation has ended; `self.sent` is then the whole reply."""
        text, _ = truncate_at_stop(self.decode(), self.stop)
        return self._release(text)

    def _release(self, text: str) -> str:
        # Decoding a longer id list keeps the earlier text in practice; if a tokenizer ever rewrote it,
        # the part already sent cannot be taken back, so only the new tail is sent.
        if len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent) :]
        self.sent += delta
        return delta
