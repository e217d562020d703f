"""A fake causal LM whose next-token logits are written in advance: exact EOS/stop/mask tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn


class ScriptedLM(nn.Module):
    """Call t (the prefill is call 0) returns last-position logits `logits[:, t]` for every row.

    logits: (B, A, V). Records the attention masks and position ids it was given.
    """

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.script = logits
        self.dropout = nn.Dropout(0.5)  # a submodule, so train/eval restoration is observable
        self.calls = 0
        self.seen_masks: list[Tensor] = []
        self.seen_positions: list[Tensor] = []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, **kw):
        assert not self.training, "generation must run in eval mode"
        self.seen_masks.append(attention_mask.clone())
        self.seen_positions.append(position_ids.clone())
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.script.shape[-1])
        logits[:, -1] = self.script[:, self.calls]
        self.calls += 1
        return SimpleNamespace(logits=logits)


def one_hot_script(rows: list[list[int]], vocab: int = 16, peak: float = 20.0) -> Tensor:
    """(B, A, V) logits whose argmax at step t of row b is rows[b][t]."""
    logits = torch.zeros(len(rows), len(rows[0]), vocab)
    for b, row in enumerate(rows):
        for t, token in enumerate(row):
            logits[b, t, token] = peak
    return logits
