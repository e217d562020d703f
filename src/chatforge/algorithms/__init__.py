"""The PPO/RLHF math as small pure tensor functions (shapes and equations in each docstring)."""

from .advantages import compute_gae, compute_token_rewards, last_token_index
from .experience import Experience
from .kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3, kl_penalty
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import IGNORE_INDEX, pairwise_loss, policy_loss, sft_loss, value_loss
from .masking import masked_mean, masked_sum, masked_var, masked_whiten, response_mask_from_tokens

__all__ = [
    "IGNORE_INDEX",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "compute_gae",
    "compute_token_rewards",
    "entropy_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "policy_loss",
    "response_mask_from_tokens",
    "sft_loss",
    "value_loss",
]
