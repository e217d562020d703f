"""Experience batching: shuffled mini-batches keep every field of a row together."""

from __future__ import annotations

import pytest
import torch

from chatforge.algorithms import Experience


def _experience(batch: int = 5, prompt: int = 2, response: int = 3) -> Experience:
    row = torch.arange(batch, dtype=torch.float32)[:, None]  # every tensor's row b holds the value b
    per_token = row.expand(batch, response).clone()
    return Experience(
        sequences=row.long().expand(batch, prompt + response).clone(),
        attention_mask=torch.ones(batch, prompt + response, dtype=torch.long),
        response_mask=torch.ones(batch, response, dtype=torch.long),
        prompt_len=prompt,
        logprobs=per_token,
        ref_logprobs=per_token + 100,
        scores=row.squeeze(1),
        rewards=per_token,
        advantages=per_token,
        stats={"reward": 1.0},
    )


def test_minibatches_split_shuffle_and_keep_rows_together():
    exp = _experience()
    parts = exp.minibatches(2, torch.Generator().manual_seed(0))
    assert [p.size for p in parts] == [3, 2]
    seen = torch.cat([p.scores for p in parts]).long()
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4]
    assert seen.tolist() != [0, 1, 2, 3, 4]  # shuffled, not split in order
    for part in parts:
        assert part.prompt_len == 2 and part.values is None and part.stats == {"reward": 1.0}
        assert torch.equal(part.sequences[:, 0].float(), part.scores)
        assert torch.equal(part.ref_logprobs[:, 0], part.scores + 100)
    again = exp.minibatches(2, torch.Generator().manual_seed(0))
    assert [p.scores.tolist() for p in parts] == [p.scores.tolist() for p in again]


def test_to_and_size():
    exp = _experience()
    moved = exp.to("cpu")
    assert moved.size == 5 and moved.prompt_len == 2
    assert torch.equal(moved.advantages, exp.advantages)


def test_minibatches_reject_bad_counts():
    with pytest.raises(ValueError):
        _experience(batch=2).minibatches(3)


def test_trimmed_drops_only_columns_that_are_padding_in_every_row():
    # Prompt width 4 (rows have 2 and 3 real prompt tokens: column 0 is padding in both), response width 5
    # (rows end after 2 and 3 tokens: columns 3 and 4 are padding in both).
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    seq = torch.arange(18).reshape(2, 9)
    per_token = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    exp = Experience(
        sequences=seq, attention_mask=attention, response_mask=response, prompt_len=4,
        logprobs=per_token, ref_logprobs=per_token, scores=torch.ones(2), rewards=per_token, advantages=per_token,
    )  # fmt: skip
    small = exp.trimmed()
    assert small.prompt_len == 3 and small.sequences.tolist() == [
        [1, 2, 3, 4, 5, 6],
        [10, 11, 12, 13, 14, 15],
    ]
    assert small.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert small.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]] and small.logprobs.tolist() == [
        [0, 1, 2],
        [5, 6, 7],
    ]
    # The response still starts at prompt_len and the masked sums are unchanged.
    assert torch.equal(small.sequences[:, small.prompt_len :], seq[:, 4:7])
    assert (small.logprobs * small.response_mask).sum() == (exp.logprobs * exp.response_mask).sum()
    assert small.trimmed() is small
