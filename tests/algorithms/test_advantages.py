"""Per-token rewards, GAE and the critic-free estimators against hand-computed values and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.algorithms import (
    compute_gae,
    compute_token_rewards,
    group_advantages,
    reinforce_pp_advantages,
)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_rewards_put_the_score_on_each_rows_last_token():
    logp = torch.tensor([[0.1, 0.2, -0.1], [0.3, 0.0, 5.0]])  # 5.0 is under the mask
    logp_ref = torch.zeros(2, 3)
    rewards, kl = compute_token_rewards(torch.tensor([1.0, 2.0]), logp, logp_ref, MASK, kl_coef=0.5)
    # -0.5 * kl, then +score at index 2 (row 0) and index 1 (row 1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 1.05], [-0.15, 2.0, 0.0]]), atol=1e-6)
    assert torch.allclose(kl, torch.tensor([[0.1, 0.2, -0.1], [0.3, 0.0, 0.0]]), atol=1e-6)


def test_token_rewards_clip_the_score_and_support_k3():
    zeros = torch.zeros(2, 3)
    rewards, _ = compute_token_rewards(torch.tensor([1.0, -7.0]), zeros, zeros, MASK, 0.1, reward_clip=1.5)
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, -1.5, 0.0]]
    logp = torch.full((2, 3), -0.6931472)  # ln 0.5 vs ln 0.25: k3 = 0.5 + ln 2 - 1 = 0.193147
    _, kl = compute_token_rewards(torch.zeros(2), logp, logp - 0.6931472, MASK, 1.0, kl_kind="k3")
    assert torch.allclose(kl, 0.193147 * MASK, atol=1e-5)


def test_empty_row_gets_no_score():
    zeros = torch.zeros(1, 3)
    rewards, _ = compute_token_rewards(torch.tensor([3.0]), zeros, zeros, torch.zeros(1, 3), 0.1)
    assert (rewards == 0).all()


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])  # 9.0 and 7.0 are under the mask
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 7.0]])
    adv, ret = compute_gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # Row 0: d2 = 1 - 0.7 = 0.3; d1 = 0.9 * 0.7 - 0.6 = 0.03; d0 = 0.9 * 0.6 - 0.5 = 0.04
    #   A2 = 0.3, A1 = 0.03 + 0.72 * 0.3 = 0.246, A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # Row 1 (value after the last real token is 0): d1 = 1 - 0.6 = 0.4; A0 = 0.04 + 0.72 * 0.4 = 0.328
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]]), atol=1e-6)


def test_gae_lambda_1_gamma_1_is_reward_to_go_minus_value():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [1], [5]])).long()
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (reward_to_go - values) * mask, atol=1e-5)
    assert torch.allclose(ret, reward_to_go * mask, atol=1e-5)


def test_gae_lambda_0_is_the_one_step_td_error():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.1, 0.2, 0.3]])
    adv, _ = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # 1 + 0.5 * 0.2 - 0.1 = 1.0; 2 + 0.5 * 0.3 - 0.2 = 1.95; 3 + 0 - 0.3 = 2.7
    assert torch.allclose(adv, torch.tensor([[1.0, 1.95, 2.7]]), atol=1e-6)


# Two prompts, G = 3 responses each: rewards (1, 0, 0) and (2, 2, 5).
GROUPS = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])


def test_grpo_divides_the_centred_reward_by_the_group_std():
    # Group 1: mean 1/3, sample std sqrt(1/3) = 0.577350; (2/3) / 0.57735 = 1.154701, (-1/3) / 0.57735 = -0.577350.
    # Group 2: mean 3, sample std sqrt(3) = 1.732051; -1 / 1.732051 = -0.577350, 2 / 1.732051 = 1.154701.
    got = group_advantages(GROUPS, 3, "grpo", eps=0.0)
    want = torch.tensor([1.154701, -0.577350, -0.577350, -0.577350, -0.577350, 1.154701])
    assert torch.allclose(got, want, atol=1e-6)


def test_dr_grpo_only_centres():
    got = group_advantages(GROUPS, 3, "dr_grpo")
    assert torch.allclose(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0]), atol=1e-6)


def test_rloo_subtracts_the_mean_of_the_others():
    # 1 - (0 + 0) / 2 = 1; 0 - (1 + 0) / 2 = -0.5; 2 - (2 + 5) / 2 = -1.5; 5 - (2 + 2) / 2 = 3.
    got = group_advantages(GROUPS, 3, "rloo")
    assert torch.allclose(got, torch.tensor([1.0, -0.5, -0.5, -1.5, -1.5, 3.0]), atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_rewards_or_of_one_response_teaches_nothing(estimator):
    assert group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), 4, estimator).abs().max() == 0
    assert group_advantages(torch.tensor([3.0, -1.0]), 1, estimator).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.tensor([1.0, 2.0]), 3, estimator)


def test_reinforce_pp_whitens_the_returns_over_the_batch():
    # Rewards (score at the last token, -0.1 KL per token), mask rows of 2 and 1 tokens:
    # returns row 0: (-0.1 + 1.0, 1.0) = (0.9, 1.0); row 1: (-1.0). Mean 0.3, unbiased var
    # ((0.6^2 + 0.7^2 + 1.3^2) / 2) = 1.27, so (x - 0.3) / sqrt(1.27).
    rewards = torch.tensor([[-0.1, 1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    got = reinforce_pp_advantages(rewards, mask)
    s = math.sqrt(1.27)
    assert torch.allclose(got, torch.tensor([[0.6 / s, 0.7 / s], [-1.3 / s, 0.0]]), atol=1e-5)
