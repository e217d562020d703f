"""Next-token selection: repetition penalty, temperature, top-k, top-p, then greedy or sampling.

B = batch, V = vocabulary. Every function works on the last-position logits `(B, V)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatforge.config.schema import GenerationConfig


def seen_token_mask(input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> Tensor:
    """`(B, V)` bool: True for every token id present in the non-padded part of each row.

    input_ids, attention_mask: `(B, P)`. Left padding is excluded so the pad id is not penalised.
    """
    batch = input_ids.shape[0]
    # Padded positions scatter into an extra column that is dropped afterwards.
    ids = input_ids.masked_fill(attention_mask == 0, vocab_size)
    seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty (Keskar et al. 2019): seen logits z -> z / p if z > 0 else z * p.

    logits: `(B, V)`, seen: `(B, V)` bool. Returns new `(B, V)` logits.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf. logits: `(B, V)`; k <= 0 is a no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of top tokens with mass >= top_p.

    logits: `(B, V)`. The most likely token is always kept; top_p >= 1 is a no-op.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_next_tokens(
    logits: Tensor,
    config: GenerationConfig,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick one token per row. logits: `(B, V)` raw model logits; seen: `(B, V)` bool or None.

    Returns (tokens `(B,)` long, logprobs `(B,)` float32), where logprobs = log_softmax(logits / T)[token]
    of the RAW logits: before repetition penalty and top-k/top-p, i.e. what the PPO training forward
    recomputes (T = 1 when greedy with temperature <= 0).
    """
    logits = logits.float()
    temperature = config.temperature if config.temperature > 0 else 1.0
    scaled = logits / temperature
    shaped = scaled
    if seen is not None and config.repetition_penalty != 1.0:
        shaped = apply_repetition_penalty(shaped, seen, config.repetition_penalty)
    if config.do_sample:
        shaped = filter_top_p(filter_top_k(shaped, config.top_k), config.top_p)
        tokens = torch.multinomial(shaped.softmax(dim=-1), 1, generator=generator).squeeze(1)
    else:
        tokens = shaped.argmax(dim=-1)
    logprobs = scaled.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
