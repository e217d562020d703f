"""Next-token selection: repetition penalty, temperature, top-k, top-p, then greedy or sampling.

B = batch, V = vocabulary. Every function works on the last-position logits `(B, V)`.

Sampling is an inverse-CDF draw: one uniform per row against float64 cumulative sums of the
probabilities. `torch.multinomial` draws one exponential per vocabulary entry instead, which was ~44%
of generation time at batch 16; this needs one softmax (also used for the log-probability), float64
block masses, and a float64 cumulative sum inside one block per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatforge.config.schema import GenerationConfig

CDF_BLOCK = 256
"""Tokens per block of the two-level inverse-CDF draw."""


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


def draw_uniforms(batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """`(batch,)` float64 uniforms in [0, 1) on `device`, drawn with `generator` on the generator's device.

    The generator may live on another device than the logits (a CPU generator for CUDA logits, or the
    reverse): numbers are always made where the generator lives and then moved, never mixing devices.
    """
    source = generator.device if generator is not None else device
    return torch.rand(batch, generator=generator, device=source, dtype=torch.float64).to(device)


def sample_inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Draw one index per row with probability weights[b, i] / weights[b].sum(). Returns `(B,)` long.

    weights: `(B, V)` unnormalised, >= 0 (0 = never drawn); uniforms: `(B,)` float64 in [0, 1).
    All sums are float64 over float32 weights, so a token is unreachable only if its share of the row's
    mass is below ~2^-50 (its chance per draw would be below 1e-15). The chosen index always has
    weight > 0: it is where a float64 cumulative sum strictly increases.
    """
    return _inverse_cdf(weights, uniforms)[0]


def _inverse_cdf(weights: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """`sample_inverse_cdf` in two levels, also returning each row's float64 total mass `(B,)`.

    A float64 cumulative sum over the whole vocabulary costs a (B, V) float64 copy; instead the uniform
    first picks a block of `CDF_BLOCK` tokens by the float64 block masses, then a token inside the block.
    """
    vocab = weights.shape[1]
    block = min(CDF_BLOCK, vocab)
    # unfold: a (B, V // block, block) view of the full blocks even when block does not divide V. A float64
    # copy then a sum is ~1.5x faster on CPU than sum(dtype=float64), and exact to the same bits.
    masses = weights.unfold(1, block, block).double().sum(dim=-1)
    if vocab % block:
        tail = weights[:, vocab - vocab % block :].double().sum(dim=-1, keepdim=True)
        masses = torch.cat([masses, tail], dim=1)
    block_cdf = masses.cumsum(dim=-1)
    total = block_cdf[:, -1]
    _check_rows_have_mass(total)
    target = _strictly_below(uniforms.to(total.dtype) * total, total)
    chosen = torch.searchsorted(block_cdf, target[:, None], right=True)  # (B, 1): masses[chosen] > 0
    before = block_cdf.gather(1, (chosen - 1).clamp(min=0)).masked_fill(chosen == 0, 0.0)
    offsets = chosen * block + torch.arange(block, device=weights.device)  # (B, block) token ids
    inner = weights.gather(1, offsets.clamp(max=vocab - 1)).masked_fill(offsets >= vocab, 0.0)
    inner_cdf = inner.to(torch.float64).cumsum_(dim=-1)
    # The block's own cumulative sum may round differently from its mass; stay inside it.
    residual = _strictly_below((target[:, None] - before).squeeze(1), inner_cdf[:, -1])
    index = torch.searchsorted(inner_cdf, residual[:, None], right=True)
    return offsets.gather(1, index).squeeze(1), total


def _strictly_below(values: Tensor, limits: Tensor) -> Tensor:
    """min(values, the float just below limits): u * total may round up to total when u is close to 1."""
    return torch.minimum(values, torch.nextafter(limits, torch.zeros_like(limits)))


def _check_rows_have_mass(total: Tensor) -> None:
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"sampling: rows {rows} have no finite positive probability mass (logits all -inf, or NaN/inf "
            "in the logits); check the model's outputs and the top-k/top-p/repetition-penalty settings"
        )


def _shapes_logits(config: GenerationConfig, seen: Tensor | None, vocab: int) -> bool:
    """True when the sampling distribution differs from softmax(logits / T) (penalty, top-k, top-p)."""
    penalty = seen is not None and config.repetition_penalty != 1.0
    filters = config.do_sample and (0 < config.top_k < vocab or config.top_p < 1.0)
    return penalty or filters


def select_next_tokens(
    logits: Tensor,
    config: GenerationConfig,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick one token per row. logits: `(B, V)` raw model logits; seen: `(B, V)` bool or None.

    Returns (tokens `(B,)` long, logprobs `(B,)` float32), where logprobs = log_softmax(logits / T)[token]
    of the RAW logits: before repetition penalty and top-k/top-p, i.e. what the PPO training forward
    recomputes (T = 1 when greedy with temperature <= 0). Sampling uses `uniforms` `(B,)` float64 in
    [0, 1) when given (the decode loop draws them for the whole original batch), else draws them with
    `generator`.
    """
    logits = logits if logits.dtype == torch.float32 else logits.float()
    temperature = config.temperature if config.temperature > 0 else 1.0
    if config.do_sample and uniforms is None:
        uniforms = draw_uniforms(logits.shape[0], generator, logits.device)
    if _shapes_logits(config, seen, logits.shape[-1]):
        return _select_shaped(logits, config, temperature, seen, uniforms)
    return _select_plain(logits, temperature, uniforms if config.do_sample else None)


def _select_plain(logits: Tensor, temperature: float, uniforms: Tensor | None) -> tuple[Tensor, Tensor]:
    """softmax(logits / T) as it is: one fused softmax serves both the draw and the log-probability.

    No `(B, V)` copy of logits / T is made when T == 1. The log-prob is log(p[token]) - log(sum p), so it
    loses precision only for tokens with p below float32's normal range (~1e-38), never drawn in practice.
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    probs = torch.softmax(scaled, dim=-1)
    if uniforms is None:
        tokens = logits.argmax(dim=-1)  # greedy on the raw logits, as transformers does
        log_mass = torch.zeros(1, dtype=torch.float64, device=logits.device)
    else:
        tokens, mass = _inverse_cdf(probs, uniforms)
        log_mass = mass.log()
    chosen = probs.gather(1, tokens[:, None]).squeeze(1).double().log()
    return tokens, (chosen - log_mass).float()


def _select_shaped(
    logits: Tensor, config: GenerationConfig, temperature: float, seen: Tensor | None, uniforms: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Penalty and/or top-k/top-p: draw from the shaped logits, report the log-prob of the raw ones."""
    scaled = logits / temperature if temperature != 1.0 else logits
    shaped = scaled
    if seen is not None and config.repetition_penalty != 1.0:
        shaped = apply_repetition_penalty(shaped, seen, config.repetition_penalty)
    if uniforms is None:
        tokens = shaped.argmax(dim=-1)
    else:
        shaped = filter_top_p(filter_top_k(shaped, config.top_k), config.top_p)
        tokens = sample_inverse_cdf(torch.softmax(shaped, dim=-1), uniforms)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs.float()
