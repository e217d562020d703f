"""Per-token rewards with a KL penalty, and generalised advantage estimation. B = batch, A = response length."""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import KLKind, kl_penalty


def last_token_index(response_mask: Tensor) -> Tensor:
    """`(B,)` index of the last 1 in each row of response_mask `(B, A)` (0 for an empty row)."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return (response_mask.long() * positions).argmax(dim=1)


def compute_token_rewards(
    scores: Tensor,
    logp: Tensor,
    logp_ref: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    reward_clip: float | None = None,
    kl_kind: KLKind = "k1",
) -> tuple[Tensor, Tensor]:
    """r_t = -beta * KL_t, plus the sequence score at the last response token (Ziegler et al. 2019; Ouyang
    et al. 2022, eq. 2).

    scores `(B,)`; logp, logp_ref, response_mask `(B, A)`. The score is clipped to [-reward_clip, reward_clip]
    when given. Returns (rewards `(B, A)`, kl `(B, A)`), both 0 where the mask is 0.
    """
    mask = response_mask.to(logp.dtype)
    kl = kl_penalty(logp, logp_ref, kl_kind) * mask
    rewards = -kl_coef * kl
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    # An empty row gets no score rather than one at position 0.
    has_tokens = mask.sum(dim=1) > 0
    score_at_end = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards = rewards.scatter_add(1, last_token_index(response_mask)[:, None], score_at_end[:, None])
    return rewards, kl


def compute_gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns_t = A_t + V_t.
    rewards, values, response_mask `(B, A)` with the mask a prefix of 1s. The value after the last real
    token is 0 (the episode ends at EOS); masked positions contribute nothing and get 0.
    Returns (advantages `(B, A)`, returns `(B, A)`).
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns
