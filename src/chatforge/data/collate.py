"""Collators: lists of token rows -> padded LongTensor batches.

Masks are built from row lengths, never by comparing ids with pad_token_id, so a tokenizer whose
pad token equals its EOS token (common for base models) keeps the loss and attention on real EOS
tokens. The pad id is tokenizer.pad_token_id, or eos_token_id when the tokenizer has no pad token.
"""

from __future__ import annotations

from .errors import DataError
from .tokenize import IGNORE_INDEX


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an EOS token. "
            "Fix: set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    return pad


def right_pad(seqs: list[list[int]], value: int):
    """(B, T) LongTensor of `seqs` right padded with `value`, and the (B, T) attention mask."""
    return _pad(seqs, value)


def _pad(seqs: list[list[int]], value: int, left: bool = False):
    """(B, T) LongTensor of `seqs` padded with `value`, and the (B, T) attention mask."""
    import torch

    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class SFTCollator:
    """SFT/PTX rows -> {input_ids, attention_mask, labels}: (B, T) right padded; labels -100 on pads.

    Packed rows (they carry position_ids) also give position_ids (B, T): each packed row restarts at
    0, and the padding tail is one more segment starting at 0. Call the model through
    `model_inputs(batch)` so packed batches get attention_mask=None and the block-diagonal mask.
    """

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        input_ids, attention_mask = _pad([r["input_ids"] for r in rows], self.pad_id)
        labels, _ = _pad([r["labels"] for r in rows], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "position_ids" in rows[0]:
            width = input_ids.shape[1]
            positions = [list(r["position_ids"]) + list(range(width - len(r["position_ids"]))) for r in rows]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        return batch


class PairCollator:
    """Reward rows -> {input_ids, attention_mask, response_mask}: (2B, T) right padded; rows 0..B-1 chosen,
    B..2B-1 rejected; response_mask is 1 on each reply's tokens (after its prompt)."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        input_ids, attention_mask = _pad(seqs, self.pad_id)
        prompt_len = torch.tensor([r["prompt_len"] for r in rows] * 2)
        positions = torch.arange(input_ids.shape[1])
        response_mask = (positions[None] >= prompt_len[:, None]).long() * attention_mask
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


class PromptCollator:
    """PPO rows -> {input_ids, attention_mask}: (B, P) LEFT padded, so generation continues every row; plus
    prompt_messages and extra (lists of B JSON strings) for rewards that read text or row fields."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, rows: list[dict]) -> dict:
        input_ids, attention_mask = _pad([r["prompt_input_ids"] for r in rows], self.pad_id, left=True)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in ("prompt_messages", "extra"):
            if key in rows[0]:
                batch[key] = [r[key] for r in rows]
        return batch


def model_inputs(batch: dict) -> dict:
    """Keyword arguments for an HF causal LM forward.

    Plain batches: input_ids and attention_mask. Packed batches: input_ids, position_ids,
    attention_mask=None and use_cache=False; transformers builds a block-diagonal causal mask from
    the position_ids restarts only when there is neither a 2D mask nor a KV cache. The right padding
    needs no mask under causal attention (no real token comes after it) and its labels are -100.
    """
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": None,
            "position_ids": batch["position_ids"],
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
