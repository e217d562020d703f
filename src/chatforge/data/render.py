"""Render messages with the tokenizer's chat template and tokenise them with exact turn boundaries.

Turn boundaries come from rendering prefixes: the tokens of message i are render(msgs[:i+1]) minus
render(msgs[:i]) (for an assistant message: minus the generation prompt, so the "<|assistant|>"
header belongs to the prompt and the reply's own tokens, end-of-turn included, get the loss).
This needs a template whose output for a conversation's prefix is a prefix of its output for the
whole conversation, which holds for the common templates; when not, a DataError names the turn.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

from .errors import DataError

# Used when the tokenizer has no chat template (base models): DS-Chat's transcript format, with EOS
# closing each assistant turn so the model learns to stop.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ '\n\n' + m['role'].capitalize() + ': ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


def template_of(tokenizer) -> str:
    """The tokenizer's chat template, or FALLBACK_TEMPLATE with a warning."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    warnings.warn(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; rendering conversations "
        "as '\\n\\nHuman: ...\\n\\nAssistant: ...<eos>' (chatforge FALLBACK_TEMPLATE). Set "
        "tokenizer.chat_template to the format your model expects.",
        stacklevel=3,
    )
    return FALLBACK_TEMPLATE


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the `eos_token_id`s of the model's
    generation config beside it (Llama 3 ends turns at <|eot_id|> while its tokenizer's EOS is
    <|end_of_text|>). Rollouts stop at these, and step 2 scores replies at the first of them."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids += _generation_eos_ids(str(getattr(tokenizer, "name_or_path", "") or ""))
    return list(dict.fromkeys(ids))


@functools.lru_cache(maxsize=64)
def _generation_eos_ids(name_or_path: str) -> tuple[int, ...]:
    path = Path(name_or_path).expanduser() / "generation_config.json"
    if name_or_path and not path.is_file() and not Path(name_or_path).expanduser().exists():
        path = _hub_cached_file(name_or_path, "generation_config.json")
    if path is None or not path.is_file():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return ()
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub model from the local HF cache only (never a download); None if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an invalid repo id, or no huggingface_hub: nothing cached then
        return None
    return Path(found) if isinstance(found, str) else None


class ChatRenderer:
    """Token ids of prompts, replies and whole conversations, with per-token assistant masks."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template or template_of(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = end_of_turn_ids(tokenizer)

    def text(self, msgs: list[dict], generation_prompt: bool = False) -> str:
        if not msgs:
            return "" if not generation_prompt else self._render([], True)
        return self._render(msgs, generation_prompt)

    def _render(self, msgs: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def ids(self, text: str) -> list[int]:
        # The template already wrote BOS and role tokens as text; don't let the tokenizer add more.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, prompt: list[dict]) -> list[int]:
        """(P,) tokens of the prompt followed by the generation prompt (the assistant header)."""
        return self.ids(self.text(prompt, generation_prompt=True))

    def reply_ids(self, prompt: list[dict], reply: list[dict]) -> list[int]:
        """(R,) tokens that follow prompt_ids(prompt) when `reply` is appended (EOS added if the template wrote none)."""
        head = self.text(prompt, generation_prompt=True)
        return self._reply_piece(self._suffix(self.text(prompt + reply), head, len(prompt)))

    def scored_reply_ids(self, prompt: list[dict], reply: list[dict]) -> list[int]:
        """reply_ids cut right after its first end-of-turn token: what a rollout ends with, so the reward
        model is trained on the token step 3 scores (ChatML writes '\\n' after <|im_end|>)."""
        ids = self.reply_ids(prompt, reply)
        stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        return ids if stop is None else ids[: stop + 1]

    def _reply_piece(self, text: str) -> list[int]:
        ids = self.ids(text)
        if self.eos_id is not None and not any(t in self.stop_ids for t in ids):
            ids.append(self.eos_id)
        return ids

    def conversation(self, msgs: list[dict]) -> tuple[list[int], list[bool]]:
        """(T,) tokens of a whole conversation and (T,) flags: True on assistant-reply tokens."""
        ids: list[int] = []
        mask: list[bool] = []
        done = ""  # text rendered so far; each turn adds the tokens of the new text only
        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":
                head = self.text(msgs[:i], generation_prompt=True)
                piece = self.ids(self._suffix(head, done, i))
                ids, mask, done = ids + piece, mask + [False] * len(piece), head
            full = self.text(msgs[: i + 1])
            tail = self._suffix(full, done, i)
            piece = self._reply_piece(tail) if msg["role"] == "assistant" else self.ids(tail)
            ids, mask, done = ids + piece, mask + [msg["role"] == "assistant"] * len(piece), full
        return ids, mask

    def _suffix(self, full: str, head: str, turn: int) -> str:
        if not full.startswith(head):
            raise DataError(
                f"chat template of {getattr(self.tokenizer, 'name_or_path', '?')!r}: rendering turn {turn + 1} "
                "changes the text of earlier turns, so turn boundaries (and the loss mask) are ambiguous. "
                "Fix: use a template whose output for a prefix of a conversation is a prefix of the whole"
            )
        return full[len(head) :]
