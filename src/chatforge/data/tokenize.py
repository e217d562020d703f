"""Unified rows -> token rows for each step, with the truncation policy and drop/truncation counts.

Truncation policy (max_prompt_length = P, max_length = L):
  * prompts keep their last P tokens (truncated from the left, so the latest turn survives);
  * responses keep their first L - len(prompt) tokens (truncated from the right);
  * a row whose prompt leaves no room for a response, or a preference pair whose chosen and rejected
    are identical (after truncation), is dropped. Every truncation and drop is counted in the Tally.
  * PTX text longer than L is cut into consecutive L-token chunks (no token is dropped).
Output rows (lists of ints):
  sft/ptx: input_ids (T,), labels (T,) with -100 where there is no loss
  reward:  chosen_input_ids (Tc,), rejected_input_ids (Tr,), prompt_len (shared prompt tokens)
  ppo:     prompt_input_ids (P,), rendered with the generation prompt; prompt_messages (JSON of the
           prompt's messages, for reward models with their own template and for reward functions) and
           extra (JSON of the source row's other scalar columns, e.g. a reference answer)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from .errors import row_error
from .render import ChatRenderer

IGNORE_INDEX = -100
STEP_COLUMNS = {
    "sft": ("input_ids", "labels"),
    "ptx": ("input_ids", "labels"),
    "reward": ("chosen_input_ids", "rejected_input_ids", "prompt_len"),
    "ppo": ("prompt_input_ids", "prompt_messages", "extra"),
}


@dataclass(frozen=True)
class Limits:
    max_prompt_length: int
    max_length: int
    loss_on: str = "assistant"


class Tally(Counter):
    """Counts of 'truncated_prompt', 'truncated_response' and 'dropped_<reason>' events."""


def _left(ids: list[int], keep: int, tally: Tally, key: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    tally[key] += 1
    return ids[len(ids) - keep :]


def _right(ids: list[int], keep: int, tally: Tally, key: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    tally[key] += 1
    return ids[:keep]


def _last_reply_start(mask: list[bool]) -> int:
    """Index where the final run of assistant tokens starts (the SFT 'response')."""
    end = max(i for i, m in enumerate(mask) if m)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def sft_row(r: ChatRenderer, row: dict, lim: Limits, tally: Tally, source: str) -> list[dict]:
    reply = row["completion"] or row["chosen"]
    if not reply:
        raise row_error(
            source,
            row["row"],
            "completion",
            "no completion/response (or chosen) for SFT",
            "fill it, or mark the dataset ':prompts' so it only feeds PPO prompts",
        )
    ids, mask = r.conversation(row["prompt"] + reply)
    labels = [t if (m or lim.loss_on == "all") else IGNORE_INDEX for t, m in zip(ids, mask)]
    p = _last_reply_start(mask)
    prompt = _left(list(range(p)), lim.max_prompt_length, tally, "truncated_prompt")
    room = lim.max_length - len(prompt)
    if room <= 0:
        tally["dropped_prompt_too_long"] += 1
        return []
    keep = prompt + _right(list(range(p, len(ids))), room, tally, "truncated_response")
    return [{"input_ids": [ids[i] for i in keep], "labels": [labels[i] for i in keep]}]


def reward_row(r: ChatRenderer, row: dict, lim: Limits, tally: Tally, source: str) -> list[dict]:
    for name in ("chosen", "rejected"):
        if not row[name]:
            raise row_error(
                source,
                row["row"],
                name,
                f"no '{name}' reply for the reward step",
                "fill it, or mark the dataset ':sft' or ':prompts' to keep it out of reward data",
            )
    if row["chosen"] == row["rejected"]:
        tally["dropped_identical_pair"] += 1
        return []
    prompt = _left(r.prompt_ids(row["prompt"]), lim.max_prompt_length, tally, "truncated_prompt")
    room = lim.max_length - len(prompt)
    if room <= 0:
        tally["dropped_prompt_too_long"] += 1
        return []
    chosen, rejected = (r.scored_reply_ids(row["prompt"], row[k]) for k in ("chosen", "rejected"))
    pair_tally = Tally()
    chosen, rejected = (_right(x, room, pair_tally, "truncated_response") for x in (chosen, rejected))
    if pair_tally:
        tally["truncated_response"] += 1
    if chosen == rejected:
        tally["dropped_identical_after_truncation"] += 1
        return []
    return [
        {
            "chosen_input_ids": prompt + chosen,
            "rejected_input_ids": prompt + rejected,
            "prompt_len": len(prompt),
        }
    ]


def ppo_row(r: ChatRenderer, row: dict, lim: Limits, tally: Tally, source: str) -> list[dict]:
    if not row["prompt"]:
        raise row_error(
            source, row["row"], "prompt", "no prompt for the PPO step", "fill it, or mark the dataset ':sft'"
        )
    ids = _left(r.prompt_ids(row["prompt"]), lim.max_prompt_length, tally, "truncated_prompt")
    messages = json.dumps(row["prompt"], ensure_ascii=False)
    return [{"prompt_input_ids": ids, "prompt_messages": messages, "extra": row.get("extra") or "{}"}]


def ptx_row(r: ChatRenderer, row: dict, lim: Limits, tally: Tally, source: str) -> list[dict]:
    if not row["text"]:
        tally["dropped_empty_text"] += 1
        return []
    ids = r.tokenizer(row["text"])["input_ids"]
    if r.eos_id is not None and (not ids or ids[-1] != r.eos_id):
        ids.append(r.eos_id)
    if len(ids) > lim.max_length:
        tally["chunked_text"] += 1
    chunks = [ids[i : i + lim.max_length] for i in range(0, len(ids), lim.max_length)]
    return [{"input_ids": c, "labels": list(c)} for c in chunks]


ROW_FUNCTIONS = {"sft": sft_row, "reward": reward_row, "ppo": ppo_row, "ptx": ptx_row}


def make_tokeniser(step: str, renderer: ChatRenderer, lim: Limits, tally: Tally, source: str):
    """A batched `Dataset.map` function: unified rows -> token rows of `step` (may drop or split rows)."""
    row_fn = ROW_FUNCTIONS[step]

    def tokenise(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in STEP_COLUMNS[step]}
        for i in range(len(batch["row"])):
            row = {k: v[i] for k, v in batch.items()}
            for produced in row_fn(renderer, row, lim, tally, source):
                for k, v in produced.items():
                    out[k].append(v)
        return out

    return tokenise
