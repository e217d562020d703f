"""Batched sampling with a KV cache for any Hugging Face causal LM: the inference half of the hybrid engine.

The loop knows only token ids. B = batch, P = (left-padded) prompt length, A = generated length, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from chatforge.config.schema import GenerationConfig

from .sampling import seen_token_mask, select_next_tokens

StopChecker = Callable[[list[int]], bool]


@dataclass
class GenerationOutput:
    sequences: Tensor
    """(B, P + A) the prompt as given (left padded), then the response; pad after a row stops."""
    response_mask: Tensor
    """(B, A) 1 for generated tokens up to and including the stop token, 0 after."""
    logprobs: Tensor
    """(B, A) log_softmax(logits / T) of each chosen token, before penalty/top-k/top-p; 0 where masked."""
    finished: Tensor
    """(B,) bool: stopped by EOS or a stop string (False: hit max_new_tokens)."""


@dataclass
class _Step:
    tokens: Tensor  # (B,) chosen ids; pad for rows that had already stopped
    logprobs: Tensor  # (B,) 0 for rows that had already stopped
    alive: Tensor  # (B,) bool: the row was still generating at this step
    stopped: Tensor  # (B,) bool: the row has stopped after this step


@dataclass
class _DecodeState:
    cache: DynamicCache
    attention_mask: Tensor  # (B, P + t)
    last_position: Tensor  # (B, 1) position id of each row's newest token
    logits: Tensor  # (B, V) next-token logits
    seen: Tensor | None  # (B, V) bool, only kept for the repetition penalty
    finished: Tensor  # (B,) bool
    history: list[list[int]] | None  # generated ids per row, only kept for the stop checker


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval (no dropout) and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _forward(model: nn.Module, input_ids: Tensor, state_mask: Tensor, positions: Tensor, cache) -> Tensor:
    """One cached forward; returns last-position logits (B, V)."""
    out = model(
        input_ids=input_ids,
        attention_mask=state_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # the prefill never materialises (B, P, V) logits
    )
    return out.logits[:, -1, :]


def _prefill(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, track_history: bool
) -> _DecodeState:
    """Run the prompt through the model once, filling the cache.

    Position ids are cumsum(mask) - 1 so a left-padded row sees the same positions as an unpadded one.
    """
    attention_mask = attention_mask.to(dtype=torch.long)
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache(config=getattr(model, "config", None))
    logits = _forward(model, input_ids, attention_mask, positions, cache)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = seen_token_mask(input_ids, attention_mask, logits.shape[-1])
    batch = input_ids.shape[0]
    return _DecodeState(
        cache=cache,
        attention_mask=attention_mask,
        last_position=positions[:, -1:],
        logits=logits,
        seen=seen,
        finished=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
        history=[[] for _ in range(batch)] if track_history else None,
    )


def _advance(model: nn.Module, state: _DecodeState, tokens: Tensor) -> None:
    """Append `tokens` (B,) to every row: the cache and the mask grow by one position."""
    ones = torch.ones_like(state.attention_mask[:, :1])
    state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
    state.last_position = state.last_position + 1
    state.logits = _forward(model, tokens[:, None], state.attention_mask, state.last_position, state.cache)
    if state.seen is not None:
        state.seen.scatter_(1, tokens[:, None], True)


def _stopped_now(
    state: _DecodeState, tokens: Tensor, eos: Tensor, stop_checker: StopChecker | None
) -> Tensor:
    """(B,) bool: rows still alive whose new token is an EOS or completes a stop string."""
    alive = ~state.finished
    stop = torch.isin(tokens, eos) & alive
    if state.history is not None and stop_checker is not None:
        for row in alive.nonzero().flatten().tolist():
            state.history[row].append(int(tokens[row]))
            if not stop[row] and stop_checker(state.history[row]):
                stop[row] = True
    return stop


def _eos_tensor(eos_token_id: int | list[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_args(config: GenerationConfig, stop_checker: StopChecker | None) -> None:
    config.validate()
    if config.stop_strings and stop_checker is None:
        # The loop has no tokenizer; silently ignoring stop strings would produce over-long responses.
        raise ValueError("config.stop_strings needs stop_checker=StopStrings(tokenizer, config.stop_strings)")


def _decode_steps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    stop_checker: StopChecker | None,
    generator: torch.Generator | None,
) -> Iterator[_Step]:
    """Yield one `_Step` per generated position until every row stopped or max_new_tokens.

    The model is in eval mode for the generator's whole life; grad is off only while computing, never
    across a `yield`, so a caller's code between tokens keeps its own autograd mode.
    """
    _check_args(config, stop_checker)
    eos = _eos_tensor(eos_token_id, input_ids.device)
    with _eval_mode(model):
        with torch.no_grad():
            state = _prefill(model, input_ids, attention_mask, config, track_history=stop_checker is not None)
        for step in range(config.max_new_tokens):
            with torch.no_grad():
                tokens, logprobs = select_next_tokens(state.logits, config, state.seen, generator)
                alive = ~state.finished
                tokens = tokens.masked_fill(state.finished, pad_token_id)
                logprobs = logprobs.masked_fill(state.finished, 0.0)
                state.finished = state.finished | _stopped_now(state, tokens, eos, stop_checker)
            yield _Step(tokens=tokens, logprobs=logprobs, alive=alive, stopped=state.finished)
            if bool(state.finished.all()) or step == config.max_new_tokens - 1:
                return
            with torch.no_grad():
                _advance(model, state, tokens)


def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    stop_checker: StopChecker | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Sample responses for a batch of LEFT-padded prompts with a KV cache.

    input_ids, attention_mask: `(B, P)`. Returns a `GenerationOutput` with A <= max_new_tokens columns
    (the loop stops as soon as every row stopped). Every random draw uses `generator`, so equally seeded
    generators give equal tokens. The model's train/eval modes are restored afterwards.
    """
    steps = list(
        _decode_steps(
            model, input_ids, attention_mask, config, eos_token_id, pad_token_id, stop_checker, generator
        )
    )
    response = torch.stack([s.tokens for s in steps], dim=1)
    return GenerationOutput(
        sequences=torch.cat([input_ids, response.to(input_ids.dtype)], dim=1),
        response_mask=torch.stack([s.alive for s in steps], dim=1).long(),
        logprobs=torch.stack([s.logprobs for s in steps], dim=1),
        finished=steps[-1].stopped.clone(),
    )


def stream_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    stop_checker: StopChecker | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield each new token id of ONE prompt (`(1, P)`) as soon as it is chosen.

    The stop token (EOS, or the token completing a stop string) is yielded too, so the ids equal
    `generate(...)`'s masked response for the same seed; callers decode with skip_special_tokens and trim
    the stop string. Closing the iterator early restores the model's mode.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt, got a batch of {input_ids.shape[0]}")
    for step in _decode_steps(
        model, input_ids, attention_mask, config, eos_token_id, pad_token_id, stop_checker, generator
    ):
        yield int(step.tokens[0])
