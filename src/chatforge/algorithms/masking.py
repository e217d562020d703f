"""Masked reductions over response tokens, and the index arithmetic of padding masks.

Masks are 0/1 (bool, int or float) and broadcast against x. B = batch, A = response length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i m_i over `dim` (all dims if None). x, mask: `(B, A)`.

    Masked entries are dropped with `where`, so a -inf or NaN under the mask cannot leak in.
    """
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i m_i / sum_i m_i over `dim` (all dims if None); 0 where the mask is empty. x, mask: `(B, A)`."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of x `(B, A)`, a scalar.

    unbiased applies Bessel's correction n / (n - 1) (skipped when n < 2, where it is undefined).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n >= 2:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch; 0 where masked out.

    x, mask: `(B, A)`. shift_mean=False adds the mean back (scales only), as done for rewards.
    Advantage whitening from "The 37 implementation details of PPO" (Huang et al. 2022).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting only real tokens, so a left-padded row sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_one_index(mask: Tensor) -> Tensor:
    """(B,) index of the last 1 in each row of mask `(B, T)` (left, right or no padding); -1 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=-1).values
