"""PPO, value, SFT and pairwise reward losses. B = batch, A = response length, T = sequence, V = vocab.

Each returns a scalar loss and, where useful, detached statistics for logging.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.data.tokenize import IGNORE_INDEX

from .masking import masked_mean, masked_sum

LossAgg = Literal["token_mean", "seq_mean", "seq_sum"]


def aggregate(per_token: Tensor, mask: Tensor, how: LossAgg, max_len: int | None = None) -> Tensor:
    """Scalar loss from a `(B, A)` per-token loss.

    token_mean: sum over every response token / their number (each token weighs the same; PPO, DAPO);
    seq_mean: mean over responses of their token mean (each response weighs the same; GRPO's paper);
    seq_sum: mean over responses of their token sum / max_len (Dr. GRPO: no length normalisation bias).
    """
    if how == "token_mean":
        return masked_mean(per_token, mask)
    per_seq = masked_sum(per_token, mask, dim=1)
    if how == "seq_mean":
        return (per_seq / mask.to(per_token.dtype).sum(1).clamp(min=1.0)).mean()
    if how == "seq_sum":
        return per_seq.mean() / float(max_len or per_token.shape[1])
    raise ValueError(f"unknown loss aggregation {how!r}")


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
    agg: LossAgg = "token_mean", max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization", eq. 7).

    rho = exp(logp - old_logp);  L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), aggregated by
    `agg`. All inputs `(B, A)`. stats: clip_frac (share of tokens where the clipped term wins), approx_kl
    (k3 estimate of KL(old || new)), ratio_mean.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg, max_len)
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


def dpo_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
    kind: Literal["sigmoid", "ipo"] = "sigmoid", label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """DPO (Rafailov et al. 2023, eq. 7) and IPO (Azar et al. 2023, eq. 17) on sequence log-probs `(B,)`.

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).
    sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (e = label_smoothing: cDPO)
    ipo:     (h - 1 / (2 beta))^2
    stats: reward_chosen / reward_rejected (beta times the log-ratio, means), accuracy (share with the
    chosen reward above the rejected one), margin (mean reward difference).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    with torch.no_grad():
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        stats = {
            "reward_chosen": reward_chosen.mean(),
            "reward_rejected": reward_rejected.mean(),
            "accuracy": (reward_chosen > reward_rejected).float().mean(),
            "margin": (reward_chosen - reward_rejected).mean(),
        }
    return losses.mean(), stats
