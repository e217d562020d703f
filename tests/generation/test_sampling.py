"""Logit shaping against hand-computed values."""

from __future__ import annotations

import math

import torch

from chatforge.config.schema import GenerationConfig
from chatforge.generation import apply_repetition_penalty, filter_top_k, filter_top_p, select_next_tokens
from chatforge.generation.sampling import seen_token_mask

NEG_INF = float("-inf")


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert filter_top_k(logits, 2).tolist() == [[NEG_INF, 4.0, 3.0, NEG_INF]]
    assert torch.equal(filter_top_k(logits, 0), logits)  # 0 = off


def test_top_p_keeps_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: mass before each = 0, 0.5, 0.8, 0.95.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_top_p(logits, 0.7).isfinite().tolist()
    assert kept == [[True, True, False, False]]  # 0.5 < 0.7 keeps token 1; 0.8 >= 0.7 drops token 2
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert filter_top_p(logits, 0.01).isfinite().tolist() == [
        [True, False, False, False]
    ]  # top-1 always kept
    assert filter_top_p(logits, 1.0).isfinite().all()


def test_top_p_respects_unsorted_vocab_order():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert filter_top_p(logits, 0.7).isfinite().tolist() == [[False, True, False, True]]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0, -4.0]]


def test_seen_token_mask_ignores_left_padding():
    ids = torch.tensor([[0, 0, 3, 2], [1, 3, 3, 3]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert seen_token_mask(ids, mask, 5).tolist() == [
        [False, False, True, True, False],
        [False, True, False, True, False],
    ]


def test_logprob_is_of_raw_tempered_logits_not_filtered():
    # Logits (ln 3, 0, 0, 0): softmax(z / 1) of token 0 = 3 / 6. Top-k=1 would make it 1, but the logprob
    # reported is the unfiltered one: ln(1/2).
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])
    config = GenerationConfig(do_sample=True, top_k=1, temperature=1.0)
    tokens, logprobs = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [0]
    assert abs(logprobs.item() - math.log(0.5)) < 1e-6
    # T = 0.5 doubles the logits: (ln 9, 0, 0, 0) -> 9 / 12.
    config = GenerationConfig(do_sample=False, temperature=0.5)
    _, logprobs = select_next_tokens(logits, config)
    assert abs(logprobs.item() - math.log(0.75)) < 1e-6


def test_sampling_uses_the_generator():
    logits = torch.zeros(64, 50)  # uniform: 64 draws from 50 tokens
    config = GenerationConfig(do_sample=True)
    a, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(1))
    b, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(1))
    c, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
