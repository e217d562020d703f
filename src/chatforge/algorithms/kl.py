"""KL between policy and reference per token, and the controllers of its coefficient.

Estimators of KL(pi || pi_ref) from samples a ~ pi, with r = log pi_ref(a) - log pi(a) (J. Schulman,
"Approximating KL divergence", 2020): k1 = -r (unbiased, high variance), k2 = r^2 / 2 (biased, low
variance), k3 = (e^r - 1) - r (unbiased, low variance, always >= 0). Inputs and outputs are `(B, A)`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref. `(B, A)`."""
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2. `(B, A)`."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1. `(B, A)`."""
    log_ratio = logp_ref - logp
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(logp: Tensor, logp_ref: Tensor, kind: KLKind = "k1") -> Tensor:
    """The per-token KL estimate of `kind` ("k1", "k2" or "k3"). `(B, A)`."""
    estimators = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    if kind not in estimators:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(estimators)}")
    return estimators[kind](logp, logp_ref)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean KL per sequence of the last batch; n_steps: samples (episodes) it held."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
