"""Per-token rewards with a KL penalty, and the advantage estimators: GAE (PPO) and the critic-free ones
(GRPO, Dr. GRPO, RLOO, REINFORCE++). B = batch of responses, A = response length, G = responses per prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .kl import KLKind, kl_penalty
from .masking import last_one_index, masked_whiten

GroupEstimator = Literal["grpo", "dr_grpo", "rloo"]


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
    last = last_one_index(response_mask).clamp(min=0)
    rewards = rewards.scatter_add(1, last[:, None], score_at_end[:, None])
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


def group_advantages(
    rewards: Tensor, group_size: int, estimator: GroupEstimator, eps: float = 1e-6
) -> Tensor:
    """Response-level advantages from the other responses to the same prompt; rewards `(B,)` -> `(B,)`.

    Rows are groups of `group_size` consecutive responses to one prompt (B = prompts x G).
      grpo:    (r_i - mean_g r) / (std_g r + eps)      (Shao et al. 2024, DeepSeekMath, outcome supervision)
      dr_grpo: r_i - mean_g r                          (Liu et al. 2025, "Understanding R1-Zero-like training")
      rloo:    r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g r)   (Ahmadian et al. 2024)
    std is the sample std (n - 1). A group whose rewards are all equal, or of one response, gets 0: it says
    nothing about which response was better.
    """
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    groups = rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    if estimator == "grpo":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif estimator == "rloo":
        centred = centred * group_size / (group_size - 1)
    elif estimator != "dr_grpo":
        raise ValueError(f"unknown group estimator {estimator!r}")
    return centred.reshape(-1)


def reinforce_pp_advantages(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """REINFORCE++ (Hu 2025): returns G_t = sum_{s >= t} r_s of the per-token rewards (score at the last
    token, -beta KL_t everywhere), whitened over every token of the batch. `(B, A)` -> `(B, A)`, 0 where
    masked."""
    mask = response_mask.to(rewards.dtype)
    returns = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    return masked_whiten(returns, response_mask)
