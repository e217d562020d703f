"""PPO, value, SFT and pairwise reward losses. B = batch, A = response length, T = sequence, V = vocab.

Each returns a scalar loss and, where useful, detached statistics for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import masked_mean

IGNORE_INDEX = -100


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization", eq. 7), token-level mean.

    rho = exp(logp - old_logp);  L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)).
    All inputs `(B, A)`. stats: clip_frac (share of tokens where the clipped term wins), approx_kl
    (k3 estimate of KL(old || new)), ratio_mean.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (Huang et al. 2022, "The 37 implementation details of PPO", detail 9).

    V_clip = V_old + clip(V - V_old, -c, c);  L = 0.5 mean_t max((V - R)^2, (V_clip - R)^2).
    All inputs `(B, A)`. stats: vf_clip_frac (share of tokens where the clipped error wins).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def sft_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross entropy: position t predicts labels[t + 1]; labels == -100 are ignored.

    logits `(B, T, V)`, labels `(B, T)`. Returns (loss_sum, n_tokens), both scalars: dividing the sums
    gathered over micro-batches and ranks gives the token-weighted mean, which per-batch means do not.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shifted_labels != IGNORE_INDEX).sum()


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry reward loss (Ouyang et al. 2022, eq. 1): mean(-log sigmoid(r_chosen - r_rejected)).

    chosen, rejected `(B,)`. stats: accuracy (share with r_chosen > r_rejected), margin (mean difference).
    """
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, stats
