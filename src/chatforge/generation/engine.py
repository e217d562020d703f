"""Batched sampling with a KV cache for any Hugging Face causal LM: the inference half of the hybrid engine.

The loop knows only token ids. B = batch, P = (left-padded) prompt length, A = generated length, V = vocab,
b = rows still computed (B until finished rows are compacted away).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from chatforge.config.schema import GenerationConfig

from .sampling import draw_uniforms, seen_token_mask, select_next_tokens

StopChecker = Callable[[list[int]], bool]

COMPACT_THRESHOLD = 0.75
"""Default: drop finished rows once fewer than this share of the computed rows are still generating."""


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
    cache: object  # a transformers Cache holding the b computed rows
    mask: Tensor  # (b, P + max_new_tokens) preallocated: the prompt mask, then ones
    width: int  # columns of `mask` the model has seen so far (P + tokens fed)
    last_position: Tensor  # (b, 1) position id of each row's newest token
    logits: Tensor  # (b, V) next-token logits
    seen: Tensor | None  # (b, V) bool, only kept for the repetition penalty
    rows: Tensor  # (b,) long: the original batch row of each computed row
    finished: Tensor  # (B,) bool over the original batch
    history: list[list[int]] | None  # generated ids per original row, only kept for the stop checker


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


def _cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers 5.24, `past_key_values` before.

    Passing `past_key_values` to a 5.24 model works but warns on every call. The forward's own signature
    decides (remote-code models may keep the old name); wrappers that only take **kwargs (peft) get the
    installed transformers' name.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if _transformers_renamed_cache() else "past_key_values"


def _transformers_renamed_cache() -> bool:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 24)


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=getattr(model, "config", None))


def _forward(
    model: nn.Module, input_ids: Tensor, mask: Tensor, positions: Tensor, cache, keyword: str
) -> Tensor:
    """One cached forward; returns last-position logits (b, V)."""
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,  # the prefill never materialises (B, P, V) logits
        **{keyword: cache},
    )
    return out.logits[:, -1, :]


def _check_cache_filled(cache, expected: int, keyword: str) -> None:
    # A model that ignores the cache argument would recompute nothing and silently decode garbage.
    if cache.get_seq_length() != expected:
        raise RuntimeError(
            f"generation: the model did not fill the KV cache passed as `{keyword}=` (length "
            f"{cache.get_seq_length()} after a {expected}-token prompt); its forward must accept a "
            "transformers Cache under that name"
        )


def _prefill(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    track_history: bool,
    keyword: str,
) -> _DecodeState:
    """Run the prompt through the model once, filling the cache.

    Position ids are cumsum(mask) - 1 so a left-padded row sees the same positions as an unpadded one.
    The mask for every later step is allocated here once (new columns are always 1) and sliced per step.
    """
    batch, prompt_len = input_ids.shape
    attention_mask = attention_mask.to(dtype=torch.long)
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = _new_cache(model)
    logits = _forward(model, input_ids, attention_mask, positions, cache, keyword)
    _check_cache_filled(cache, prompt_len, keyword)
    mask = attention_mask.new_ones(batch, prompt_len + config.max_new_tokens)
    mask[:, :prompt_len] = attention_mask
    seen = None
    if config.repetition_penalty != 1.0:
        seen = seen_token_mask(input_ids, attention_mask, logits.shape[-1])
    return _DecodeState(
        cache=cache,
        mask=mask,
        width=prompt_len,
        last_position=positions[:, -1:],
        logits=logits,
        seen=seen,
        rows=torch.arange(batch, device=input_ids.device),
        finished=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
        history=[[] for _ in range(batch)] if track_history else None,
    )


def _advance(model: nn.Module, state: _DecodeState, tokens: Tensor, keyword: str) -> None:
    """Feed `tokens` (b,) to the computed rows: the cache and the mask grow by one position."""
    state.width += 1
    state.last_position = state.last_position + 1
    mask = state.mask[:, : state.width]
    state.logits = _forward(model, tokens[:, None], mask, state.last_position, state.cache, keyword)
    if state.seen is not None:
        state.seen.scatter_(1, tokens[:, None], True)


def _compactable(cache) -> bool:
    """Only plain (full or sliding-window) dynamic layers are known to index-select every cached state."""
    from transformers import cache_utils

    plain = tuple(
        getattr(cache_utils, name)
        for name in ("DynamicLayer", "DynamicSlidingWindowLayer")
        if hasattr(cache_utils, name)
    )
    return all(type(layer) in plain for layer in getattr(cache, "layers", [None]))


def _compact(state: _DecodeState) -> None:
    """Drop the computed rows that have finished from the cache, mask, positions and penalty state."""
    keep = (~state.finished[state.rows]).nonzero().flatten()
    state.cache.batch_select_indices(keep)
    state.mask = state.mask[keep]
    state.last_position = state.last_position[keep]
    state.rows = state.rows[keep]
    if state.seen is not None:
        state.seen = state.seen[keep]


def _is_stop_token(tokens: Tensor, eos: Tensor) -> Tensor:
    """(B,) bool: token is one of the EOS ids (a comparison, not torch.isin, for the usual single id)."""
    if eos.numel() == 1:
        return tokens == eos[0]
    return (tokens[:, None] == eos).any(dim=1)


def _stopped_now(
    state: _DecodeState, tokens: Tensor, eos: Tensor, stop_checker: StopChecker | None
) -> Tensor:
    """(B,) bool: rows still alive whose new token is an EOS or completes a stop string."""
    alive = ~state.finished
    stop = _is_stop_token(tokens, eos) & alive
    if state.history is not None and stop_checker is not None:
        for row in alive.nonzero().flatten().tolist():
            state.history[row].append(int(tokens[row]))
            if not stop[row] and stop_checker(state.history[row]):
                stop[row] = True
    return stop


def _eos_tensor(eos_token_id: int | list[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_args(config: GenerationConfig, stop_checker: StopChecker | None, compact_threshold: float) -> None:
    config.validate()
    if config.stop_strings and stop_checker is None:
        # The loop has no tokenizer; silently ignoring stop strings would produce over-long responses.
        raise ValueError("config.stop_strings needs stop_checker=StopStrings(tokenizer, config.stop_strings)")
    if not 0.0 <= compact_threshold <= 1.0:
        raise ValueError(f"compact_threshold must be in [0, 1] (0 = never compact), got {compact_threshold}")


def _choose(
    state: _DecodeState, config: GenerationConfig, generator: torch.Generator | None, pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """Pick the next token of every original row: (tokens (B,), logprobs (B,)); pad / 0 for stopped rows.

    Uniforms are drawn for the whole original batch every step, so a row's draws do not depend on which
    other rows are still computed.
    """
    batch = state.finished.shape[0]
    compacted = state.rows.shape[0] < batch
    uniforms = None
    if config.do_sample:
        uniforms = draw_uniforms(batch, generator, state.logits.device)
        uniforms = uniforms[state.rows] if compacted else uniforms
    tokens, logprobs = select_next_tokens(state.logits, config, state.seen, uniforms=uniforms)
    if compacted:
        tokens = tokens.new_full((batch,), pad_token_id).index_copy_(0, state.rows, tokens)
        logprobs = logprobs.new_zeros(batch).index_copy_(0, state.rows, logprobs)
    return tokens.masked_fill(state.finished, pad_token_id), logprobs.masked_fill(state.finished, 0.0)


def _decode_steps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    stop_checker: StopChecker | None,
    generator: torch.Generator | None,
    compact_threshold: float = COMPACT_THRESHOLD,
) -> Iterator[_Step]:
    """Yield one `_Step` per generated position until every row stopped or max_new_tokens.

    The model is in eval mode for the generator's whole life; grad is off only while computing, never
    across a `yield`, so a caller's code between tokens keeps its own autograd mode.
    """
    _check_args(config, stop_checker, compact_threshold)
    eos = _eos_tensor(eos_token_id, input_ids.device)
    keyword = _cache_keyword(model)
    with _eval_mode(model):
        with torch.no_grad():
            state = _prefill(model, input_ids, attention_mask, config, stop_checker is not None, keyword)
        compactable = compact_threshold > 0 and _compactable(state.cache)
        for step in range(config.max_new_tokens):
            with torch.no_grad():
                tokens, logprobs = _choose(state, config, generator, pad_token_id)
                alive = ~state.finished
                state.finished = state.finished | _stopped_now(state, tokens, eos, stop_checker)
            yield _Step(tokens=tokens, logprobs=logprobs, alive=alive, stopped=state.finished)
            n_alive = int((~state.finished).sum())
            if n_alive == 0 or step == config.max_new_tokens - 1:
                return
            with torch.no_grad():
                if compactable and n_alive < compact_threshold * state.rows.shape[0]:
                    _compact(state)
                compacted = state.rows.shape[0] < tokens.shape[0]
                _advance(model, state, tokens[state.rows] if compacted else tokens, keyword)


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
    compact_threshold: float = COMPACT_THRESHOLD,
) -> GenerationOutput:
    """Sample responses for a batch of LEFT-padded prompts with a KV cache.

    input_ids, attention_mask: `(B, P)`. Returns a `GenerationOutput` with A <= max_new_tokens columns
    (the loop stops as soon as every row stopped). Every random draw uses `generator` (on any device:
    uniforms are drawn on the generator's device and moved), so equally seeded generators give equal
    tokens. Rows that stopped are dropped from the computed batch (KV cache, mask) once fewer than
    `compact_threshold` of the computed rows still generate (0 = never); outputs do not depend on it.
    The model's train/eval modes are restored afterwards.
    """
    steps = list(
        _decode_steps(
            model,
            input_ids,
            attention_mask,
            config,
            eos_token_id,
            pad_token_id,
            stop_checker,
            generator,
            compact_threshold,
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
