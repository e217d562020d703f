"""Per-token log-probabilities and entropies from logits. B = batch, N = positions, V = vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per chunk of the fp32 log-softmax: bounds the extra memory to ~64 MB whatever B * N * V is.
_CHUNK_ELEMENTS = 1 << 24


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log softmax(z / T)[token] per position, and optionally the entropy of softmax(z / T).

    logits `(B, N, V)` (any float dtype), tokens `(B, N)` -> (logp `(B, N)` fp32, entropy `(B, N)` fp32 or
    None). One fused log-softmax pass over row chunks (no (B, N, V) fp32 copy when the logits are not fp32
    and no division when T = 1); the entropy -sum p log p comes from the same pass, without gradient.
    """
    flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    logps, entropies = [], []
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows]
        chunk = chunk if chunk.dtype == torch.float32 else chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        log_probs = chunk.log_softmax(dim=-1)
        logps.append(log_probs.gather(-1, flat_tokens[start : start + rows, None]).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                entropies.append(-(log_probs.exp() * log_probs).nan_to_num(0.0).sum(-1))
    shape = tokens.shape
    logp = torch.cat(logps).reshape(shape) if logps else flat.new_zeros(shape, dtype=torch.float32)
    entropy = None
    if with_entropy:
        entropy = torch.cat(entropies).reshape(shape) if entropies else logp.new_zeros(shape)
    return logp, entropy
