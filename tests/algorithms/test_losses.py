"""PPO, value, SFT and pairwise losses against hand-computed values and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.algorithms import aggregate, dpo_loss, pairwise_loss, policy_loss, sft_loss, value_loss
from chatforge.algorithms.diversity import distinct_n, identical_share


def test_policy_loss_hand_values_and_gradients():
    # ratios 1.5, 0.5, 1.1, 1.0 (masked); advantages 1, 1, -1, 2; clip 0.2
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped ratio becomes 1.2); token 1: max(-0.5, -0.8) = -0.5;
    # token 2: max(1.1, 1.1) = 1.1.  mean = -0.6 / 3
    assert math.isclose(loss.item(), -0.2, abs_tol=1e-6)
    assert math.isclose(stats["clip_frac"].item(), 1 / 3, abs_tol=1e-6)
    assert math.isclose(stats["ratio_mean"].item(), 3.1 / 3, abs_tol=1e-6)
    # k3 = (rho - 1) - ln rho: 0.094535 + 0.193147 + 0.004690
    assert math.isclose(stats["approx_kl"].item(), 0.292372 / 3, abs_tol=1e-6)
    loss.backward()
    # d/dlogp of -A rho / 3 = -A rho / 3; the clipped token and the masked one get no gradient.
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 3, 1.1 / 3, 0.0]]), atol=1e-6)


def test_policy_ratio_is_exactly_1_on_the_first_minibatch():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=gen)
    adv = torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_frac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert torch.allclose(loss, -adv.mean())


def test_value_loss_hand_values():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 0.9, 2.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: V_clip = 1.2, max(0.25, 0.64) = 0.64 (clipped wins); token 1: inside the range, 0.81
    assert math.isclose(loss.item(), 0.5 * (0.64 + 0.81) / 2, abs_tol=1e-6)
    assert stats["vf_clip_frac"].item() == 0.5


def test_sft_loss_is_shifted_sum_and_count():
    # position 0 predicts label 1 from (0, ln 3): -ln 0.75; position 1 predicts label 0 from (0, 0): ln 2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [100.0, -100.0]]])
    loss_sum, n = sft_loss(logits, torch.tensor([[-100, 1, 0]]))
    assert math.isclose(loss_sum.item(), -math.log(0.75) + math.log(2), abs_tol=1e-6)  # 0.980829
    assert n.item() == 2
    loss_sum, n = sft_loss(logits, torch.tensor([[7, -100, 0]]))  # the first label is never predicted
    assert math.isclose(loss_sum.item(), math.log(2), abs_tol=1e-6) and n.item() == 1


def test_sft_sums_give_a_token_weighted_mean_across_micro_batches():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 9, generator=gen)
    labels = torch.randint(0, 9, (3, 6), generator=gen)
    labels[0, :5] = -100  # uneven token counts per row
    parts = [sft_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    total, count = sft_loss(logits, labels)
    assert torch.allclose(sum(p[0] for p in parts), total, atol=1e-5)
    assert sum(int(p[1]) for p in parts) == int(count) == 1 + 5 + 5


def test_pairwise_loss_hand_values():
    loss, stats = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # margins +1, -1: ln(1 + e^-1) = 0.313262, ln(1 + e) = 1.313262
    assert math.isclose(loss.item(), 0.813262, abs_tol=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == 0.0


def test_loss_aggregations_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # 9.0 and 0.0 are under the mask
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert aggregate(per_token, mask, "seq_mean").item() == pytest.approx((2 + 4) / 2)  # means 2 and 4
    assert aggregate(per_token, mask, "seq_sum", max_len=5).item() == pytest.approx((6 + 4) / 2 / 5)


def test_dpo_sigmoid_ipo_and_label_smoothing_hand_values():
    # h = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.1: -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-3.0])
    ref_c, ref_r = torch.tensor([-2.0]), torch.tensor([-2.5])
    loss, stats = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)
    assert stats["reward_chosen"].item() == pytest.approx(0.1) and stats[
        "reward_rejected"
    ].item() == pytest.approx(-0.05)
    assert stats["accuracy"].item() == 1.0 and stats["margin"].item() == pytest.approx(0.15)
    # cDPO, e = 0.2: 0.8 * 0.620957 + 0.2 * -log sigmoid(-0.15) (= 0.770957) = 0.650957
    smooth, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.650957, abs=1e-6)
    # IPO: (1.5 - 1 / 0.2)^2 = 12.25
    ipo, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, kind="ipo")
    assert ipo.item() == pytest.approx(12.25, abs=1e-5)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    loss.backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta / 2 = -0.25
    assert chosen.grad.item() == pytest.approx(-0.25) and rejected.grad.item() == pytest.approx(0.25)


def test_distinct_n_and_identical_share_hand_values():
    responses = [[1, 2, 3], [1, 2, 3], [4, 5]]
    assert distinct_n(responses, 1) == pytest.approx(5 / 8)  # unigrams 1 2 3 4 5 of 8
    assert distinct_n(responses, 2) == pytest.approx(3 / 5)  # (1,2) (2,3) (4,5) of 5
    assert identical_share(responses) == pytest.approx(1 / 3)
    assert identical_share([[7]] * 4) == pytest.approx(3 / 4) and distinct_n([], 2) == 0.0
