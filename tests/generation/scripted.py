"""A fake causal LM whose next-token logits are written in advance: exact EOS/stop/mask tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn


class ScriptedLM(nn.Module):
    """Call t (the prefill is call 0) returns last-position logits `logits[b, t]` for original row b.

    logits: (B, A, V). The KV cache it is given holds each row's original index (one "key" per position),
    so when the loop drops finished rows from the cache, the remaining rows still read their own script,
    and a wrong index-select shows up as wrong tokens. Records the masks and position ids it was given.
    """

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.script = logits
        self.dropout = nn.Dropout(0.5)  # a submodule, so train/eval restoration is observable
        self.calls = 0
        self.seen_masks: list[Tensor] = []
        self.seen_positions: list[Tensor] = []
        self.seen_rows: list[list[int]] = []

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, **kw):
        assert not self.training, "generation must run in eval mode"
        assert cache is not None, "generation must pass its KV cache as `cache=`"
        self.seen_masks.append(attention_mask.clone())
        self.seen_positions.append(position_ids.clone())
        batch, length = input_ids.shape
        if self.calls == 0:
            rows = torch.arange(batch, dtype=torch.float32)
        else:
            rows = cache.layers[0].keys[:, 0, 0, 0]
        states = rows[:, None, None, None].expand(batch, 1, length, 1).contiguous()
        cache.update(states, states, 0)
        index = rows.long()
        self.seen_rows.append(index.tolist())
        logits = torch.zeros(batch, length, self.script.shape[-1])
        logits[:, -1] = self.script[index, self.calls]
        self.calls += 1
        return SimpleNamespace(logits=logits)


def one_hot_script(rows: list[list[int]], vocab: int = 16, peak: float = 20.0) -> Tensor:
    """(B, A, V) logits whose argmax at step t of row b is rows[b][t]."""
    logits = torch.zeros(len(rows), len(rows[0]), vocab)
    for b, row in enumerate(rows):
        for t, token in enumerate(row):
            logits[b, t, token] = peak
    return logits
