"""Per-token log-probabilities and entropies from logits. B = batch, A = positions, V = vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log pi(token) = z_token - logsumexp(z), per position. logits `(B, A, V)`, tokens `(B, A)` -> `(B, A)` fp32.

    Never materialises a (B, A, V) log-softmax; low-precision logits are upcast one row at a time so the
    fp32 copy is (A, V), not (B, A, V).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = [logprobs_from_logits(row.float(), row_tokens) for row, row_tokens in zip(logits, tokens)]
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v per position. logits `(B, A, V)` -> `(B, A)` fp32."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
