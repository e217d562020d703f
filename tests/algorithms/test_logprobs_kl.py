"""Log-probs, entropy, KL estimators and KL controllers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    token_logprobs,
)


def logprobs_from_logits(logits, tokens):
    return token_logprobs(logits, tokens)[0]


def entropy_from_logits(logits):
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return token_logprobs(logits, tokens, with_entropy=True)[1]


LN3 = math.log(3.0)


def test_logprobs_hand_values():
    # Logits (0, ln 3, 0): probabilities 1/5, 3/5, 1/5.
    logits = torch.tensor([[[0.0, LN3, 0.0], [0.0, LN3, 0.0]]])
    got = logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(got, torch.tensor([[math.log(0.6), math.log(0.2)]]), atol=1e-6)


def test_logprobs_stable_for_large_logits_and_low_precision():
    logits = torch.tensor([[[1000.0, 0.0]]])
    assert logprobs_from_logits(logits, torch.tensor([[0]])).item() == 0.0
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == -1000.0
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen).bfloat16()
    tokens = torch.randint(0, 11, (3, 4), generator=gen)
    got = logprobs_from_logits(logits, tokens)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    expected = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_entropy_hand_values():
    # -(2 * 0.2 ln 0.2 + 0.6 ln 0.6) = 0.950271; a uniform 4-way distribution has ln 4.
    logits = torch.tensor([[[0.0, LN3, 0.0, -1e4], [1.0, 1.0, 1.0, 1.0]]])
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([[0.950271, math.log(4)]]), atol=1e-5)


def test_temperature_scales_the_logits_and_chunks_do_not_matter(monkeypatch):
    # Logits (0, 2 ln 3, 0) at T = 2 are (0, ln 3, 0): probabilities 1/5, 3/5, 1/5.
    logits = torch.tensor([[[0.0, 2 * LN3, 0.0]]])
    logp, entropy = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0, with_entropy=True)
    assert math.isclose(logp.item(), math.log(0.6), abs_tol=1e-6)
    assert math.isclose(entropy.item(), 0.950271, abs_tol=1e-5)
    gen = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 5, 7, generator=gen), torch.randint(0, 7, (3, 5), generator=gen)
    whole = token_logprobs(logits, tokens, 0.7, with_entropy=True)
    monkeypatch.setattr("chatforge.algorithms.logprobs._CHUNK_ELEMENTS", 7 * 2)  # 2 rows per chunk
    chunked = token_logprobs(logits, tokens, 0.7, with_entropy=True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_kl_estimators_hand_values():
    logp, logp_ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert math.isclose(kl_k1(logp, logp_ref).item(), math.log(2), rel_tol=1e-6)  # 0.693147
    assert math.isclose(kl_k2(logp, logp_ref).item(), 0.5 * math.log(2) ** 2, rel_tol=1e-6)  # 0.240227
    assert math.isclose(kl_k3(logp, logp_ref).item(), 0.5 + math.log(2) - 1, rel_tol=1e-6)  # 0.193147
    assert torch.equal(kl_penalty(logp, logp_ref, "k3"), kl_k3(logp, logp_ref))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, logp_ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_expectations_equal_the_exact_kl():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) = 0.5 ln 2 + 0.5 ln(2/3) = 0.143841.
    logp, logq = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    p = logp.exp()
    assert math.isclose((p * kl_k1(logp, logq)).sum().item(), 0.143841, abs_tol=1e-6)
    assert math.isclose((p * kl_k3(logp, logq)).sum().item(), 0.143841, abs_tol=1e-6)


def test_kl_is_zero_when_actor_equals_reference():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    logp, logp_ref = logprobs_from_logits(logits, tokens), logprobs_from_logits(logits.clone(), tokens)
    for kind in ("k1", "k2", "k3"):
        assert (kl_penalty(logp, logp_ref, kind) == 0).all()


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)  # error 1.0 clipped to 0.2: x (1 + 0.2 * 256 / 10000)
    assert math.isclose(ctl.value, 0.2 * 1.00512, rel_tol=1e-12)
    ctl.update(current_kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert math.isclose(ctl.value, 0.2 * 1.00512 * 0.99488, rel_tol=1e-12)
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=6.6, n_steps=100)  # error 0.1 (unclipped): x 1.01
    assert math.isclose(ctl.value, 0.101, rel_tol=1e-12)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05
