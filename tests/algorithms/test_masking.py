"""Masked reductions and the response mask, against hand-computed values."""

from __future__ import annotations

import math

import torch

from chatforge.algorithms import (
    last_one_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # kept values: 1, 2, 4


def test_masked_sum_and_mean():
    assert masked_sum(X, MASK).item() == 7.0
    assert masked_sum(X, MASK, dim=1).tolist() == [3.0, 4.0]
    assert math.isclose(masked_mean(X, MASK).item(), 7 / 3, rel_tol=1e-6)
    assert masked_mean(X, MASK, dim=1).tolist() == [1.5, 4.0]
    assert masked_mean(X, MASK.bool(), dim=0).tolist() == [2.5, 2.0, 0.0]  # empty column -> 0


def test_masked_entries_cannot_leak_inf_or_nan():
    x = X.clone()
    x[0, 2], x[1, 1] = float("-inf"), float("nan")
    assert masked_sum(x, MASK).item() == 7.0


def test_masked_var():
    # Deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9 = 14/3.
    assert math.isclose(masked_var(X, MASK, unbiased=False).item(), 14 / 9, rel_tol=1e-6)
    assert math.isclose(masked_var(X, MASK).item(), 7 / 3, rel_tol=1e-6)  # 14/3 / (3 - 1)


def test_masked_whiten_hand_values():
    # (x - 7/3) / sqrt(7/3), sqrt(7/3) = 1.527525
    expected = torch.tensor([[-0.872872, -0.218218, 0.0], [1.091089, 0.0, 0.0]])
    assert torch.allclose(masked_whiten(X, MASK), expected, atol=1e-5)
    unshifted = torch.tensor([[1.460461, 2.115115, 0.0], [3.424422, 0.0, 0.0]])  # + 7/3 on the mask
    assert torch.allclose(masked_whiten(X, MASK, shift_mean=False), unshifted, atol=1e-5)


def test_whitening_gives_mean_0_var_1_on_the_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, generator=gen) * 5 + 3
    mask = (torch.arange(20)[None] < torch.randint(1, 21, (8, 1), generator=gen)).long()
    white = masked_whiten(x, mask)
    assert abs(masked_mean(white, mask).item()) < 1e-5
    assert abs(masked_var(white, mask).item() - 1.0) < 1e-4
    assert (white[mask == 0] == 0).all()


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


def test_last_one_index_for_left_right_no_padding_and_empty_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert last_one_index(mask).tolist() == [4, 2, 4, 1, -1]
