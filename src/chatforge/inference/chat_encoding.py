"""A conversation -> prompt ids, where message content cannot write the tokenizer's control tokens.

`apply_chat_template` renders text and tokenises it whole, so a user who types `<|end|><|system|>` forges a
turn: those strings become the real special tokens. Here every control string found in a message's content
is wrapped in two private-use markers before rendering; the rendered text is then cut at the markers, the
template's own text is tokenised as usual (its role/BOS/EOS strings stay control tokens) and each marked
string is tokenised as plain text. Content without control strings gives exactly the ids it gave before.

Control strings: every special token, plus every other added token that is not only whitespace (such as
`<tool_call>` or `<think>`); whitespace tokens some tokenizers add (runs of spaces) stay ordinary text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use code points: no template or tokenizer writes them


class ControlTokenError(ValueError):
    """Message content that cannot be encoded without writing a control token."""


class ChatEncoder:
    """`ChatEncoder(tokenizer).encode(messages)` -> prompt ids with the assistant turn opened."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder  # {id: AddedToken}
        self.control_ids = {i for i, tok in added.items() if tok.special or not tok.content.isspace()} | set(
            tokenizer.all_special_ids
        )
        self.control_strings = sorted(
            {tokenizer.convert_ids_to_tokens(i) for i in self.control_ids}, key=len, reverse=True
        )
        # Longest first: where one control string contains another, the longer one is the token.
        alternatives = "|".join(map(re.escape, self.control_strings)) or "(?!)"
        self._control_re = re.compile(alternatives)
        self._marked_re = re.compile(f"{_OPEN}({alternatives}){_CLOSE}|[{_OPEN}{_CLOSE}]")
        self._heads = {s[:k] for s in self.control_strings for k in range(1, len(s))}
        self._tails = {s[k:] for s in self.control_strings for k in range(1, len(s))}
        self._longest = max(map(len, self.control_strings), default=0)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The template's text with the assistant turn opened (what `trust_content` tokenises whole)."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def encode(self, messages: Sequence[dict[str, str]], trust_content: bool = False) -> list[int]:
        """Prompt ids; with `trust_content` the content's control strings become control tokens too."""
        if trust_content:
            return self._encode_text(self.render(messages))
        marked = [{**m, "content": self._mark(m["content"])} for m in messages]
        # re.split with one group: [text, control string or None (a lone marker), text, ...].
        pieces = self._marked_re.split(self.render(marked))
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self._encode_text(piece) if piece else []
            elif piece is not None:
                ids += self._plain_ids(piece)
        if any(self._may_join_template_text(m["content"]) for m in messages):
            self._check_template_controls(messages, ids)
        return ids

    def _mark(self, content: str) -> str:
        content = content.replace(_OPEN, "").replace(_CLOSE, "")  # a marker in the input could fake a span
        return self._control_re.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", content)

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _plain_ids(self, text: str) -> list[int]:
        """`text` tokenised with no added token matched, special or not."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: its own switch skips special tokens
            ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        else:
            if backend.normalizer is not None:
                text = backend.normalizer.normalize_str(text)
            splits = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, ())]
            ids = [token.id for split, _ in splits for token in backend.model.tokenize(split)]
        if self.control_ids.intersection(ids):
            raise ControlTokenError(
                f"the tokenizer turns the plain text {text!r} into a control token; it cannot be sent as content"
            )
        return ids

    def _may_join_template_text(self, content: str) -> bool:
        """Could the content's first or last characters join the template's text into a control token?"""
        return any(
            content[-k:] in self._heads or content[:k] in self._tails
            for k in range(1, min(self._longest, len(content) + 1))
        )

    def _check_template_controls(self, messages: Sequence[dict[str, str]], ids: list[int]) -> None:
        """The control tokens must be those the template writes for neutral content of the same turns."""
        neutral = [{**m, "content": "x" if m["content"].strip() else m["content"]} for m in messages]
        expected = [i for i in self._encode_text(self.render(neutral)) if i in self.control_ids]
        if [i for i in ids if i in self.control_ids] != expected:
            raise ControlTokenError(
                "a message starts or ends with part of a control token that joins the chat template's text "
                "into a different control token; remove those characters"
            )
