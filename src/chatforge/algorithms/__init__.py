"""The RL math as small pure tensor functions (shapes and equations in each docstring)."""

from .advantages import compute_gae, compute_token_rewards, group_advantages, reinforce_pp_advantages
from .experience import Experience
from .kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3, kl_penalty
from .logprobs import token_logprobs
from .losses import IGNORE_INDEX, aggregate, dpo_loss, pairwise_loss, policy_loss, sft_loss, value_loss
from .masking import (
    last_one_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "aggregate",
    "compute_gae",
    "compute_token_rewards",
    "dpo_loss",
    "group_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_one_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "policy_loss",
    "position_ids_from_mask",
    "reinforce_pp_advantages",
    "sft_loss",
    "token_logprobs",
    "value_loss",
]
