"""Stop strings: the only place generation touches a tokenizer, and only to decode a short tail."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopStrings:
    """`StopStrings(tokenizer, ["\\nUser:"])(generated_ids) -> bool`: True once the text holds a stop string.

    Called after every new token with the row's generated ids (response only, not the prompt). Only the
    last few tokens are decoded, so a check costs O(len(stop)) rather than O(len(response)).
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        # Every non-special token decodes to >= 1 byte, so this many tokens cover the longest stop string;
        # the margin absorbs tokenizers that drop a leading space or split a UTF-8 character.
        longest = max((len(s.encode("utf-8")) for s in self.stop_strings), default=0)
        self.tail_tokens = longest + 4

    def __call__(self, generated_ids: list[int]) -> bool:
        if not self.stop_strings or not generated_ids:
            return False
        tail = self.tokenizer.decode(generated_ids[-self.tail_tokens :], skip_special_tokens=False)
        # `in`, not `endswith`: the newest token may complete a stop string and carry more text after it.
        # Earlier tokens were checked at their own step, so a hit here is new.
        return any(s in tail for s in self.stop_strings)
