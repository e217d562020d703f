"""The forwards trainers need, as functions of a callable model: response log-probs, per-token values,
sequence scores and the LM loss. `TrainEngine`'s verbs call these after choosing the mode; here live
position ids, padding, the response slice and Ulysses sharding, so no trainer handles them.

B = batch, P = prompt length (left padded), A = response length, T = P + A, V = vocabulary, H = score heads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from chatforge.algorithms import position_ids_from_mask, sft_loss, token_logprobs

from .sequence_parallel import SPLayout, gather_sequence, shard_batch, sharded_sft_loss, sp_model_inputs


@functools.lru_cache(maxsize=32)
def _accepts(forward: Callable, name: str) -> bool:
    return name in inspect.signature(forward).parameters


def _base_forward(model: torch.nn.Module) -> Callable:
    """The HF model's own forward (inside peft and DeepSpeed wrappers), for signature checks."""
    inner = model
    while hasattr(inner, "get_base_model") or hasattr(inner, "module"):
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.module
    return type(inner).forward


def _full_inputs(model, sequences: Tensor, attention_mask: Tensor, keep: int | None = None) -> dict:
    """Forward kwargs of a whole (B, T) batch: positions counted over real tokens (left padding)."""
    forward = _base_forward(model)
    kwargs = {"input_ids": sequences, "attention_mask": attention_mask, "use_cache": False}
    if _accepts(forward, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if keep is not None and _accepts(forward, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    return kwargs


def response_logprobs(
    call: Callable, model: torch.nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_len: int,
    temperature: float, sp: SPLayout, with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(B, A) log pi(a_t | s_t) of the response tokens at `temperature`, and (B, A) entropies or None.

    Only the logits that predict response tokens are computed (positions P-1 .. T-2); under Ulysses each
    rank computes its sequence shard and the per-token results are gathered (differentiably)."""
    width = sequences.shape[1]
    if sp.enabled:
        local = shard_batch({"input_ids": sequences, "attention_mask": attention_mask}, sp)
        logits = call(**sp_model_inputs(local)).logits
        logp, entropy = token_logprobs(logits, local["shift_input_ids"], temperature, with_entropy)
        logp = gather_sequence(logp, sp, width)[:, prompt_len - 1 : -1]
        if entropy is not None:
            entropy = gather_sequence(entropy, sp, width)[:, prompt_len - 1 : -1]
        return logp, entropy
    n_response = width - prompt_len
    out = call(**_full_inputs(model, sequences, attention_mask, keep=n_response + 1))
    logits = out.logits[:, -(n_response + 1) : -1]
    return token_logprobs(logits, sequences[:, prompt_len:], temperature, with_entropy)


def next_token_logprobs(
    call: Callable, model: torch.nn.Module, sequences: Tensor, attention_mask: Tensor, sp: SPLayout,
) -> Tensor:  # fmt: skip
    """(B, T - 1) log p(x_t | x_<t) for t = 1 .. T-1 of any padded batch (DPO's sequence log-probs)."""
    width = sequences.shape[1]
    if sp.enabled:
        local = shard_batch({"input_ids": sequences, "attention_mask": attention_mask}, sp)
        logp, _ = token_logprobs(call(**sp_model_inputs(local)).logits, local["shift_input_ids"])
        return gather_sequence(logp, sp, width)[:, :-1]
    logits = call(**_full_inputs(model, sequences, attention_mask)).logits[:, :-1]
    return token_logprobs(logits, sequences[:, 1:])[0]


def token_values(
    call: Callable, model: torch.nn.Module, sequences: Tensor, attention_mask: Tensor, sp: SPLayout
) -> Tensor:
    """(B, T, H) the score head's output at every position (reward models and critics).

    The head's per-token output is read with a forward hook, so the model is still called through its root
    forward (a DeepSpeed engine's included) and ZeRO-3's bookkeeping holds."""
    captured: list[Tensor] = []
    hook = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        if sp.enabled:
            local = shard_batch({"input_ids": sequences, "attention_mask": attention_mask}, sp)
            call(**sp_model_inputs(local))
        else:
            call(**_full_inputs(model, sequences, attention_mask))
    finally:
        hook.remove()
    values = captured[-1].float()
    return gather_sequence(values, sp, sequences.shape[1]) if sp.enabled else values


def sequence_scores(model: torch.nn.Module, sequences: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, H) a plain (unwrapped) scorer's outputs at each row's last real token, any padding side.
    `TrainEngine.scores` is the same for an engine."""
    from chatforge.algorithms import last_one_index

    from .sequence_parallel import SPLayout

    values = token_values(model, model, sequences, attention_mask, SPLayout(1, 0, 0, 1))
    last = last_one_index(attention_mask).clamp(min=0)
    return values[torch.arange(values.shape[0], device=values.device), last]


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    from chatforge.models.lora import base_model_of

    base = base_model_of(model)
    head = getattr(base, "score", None)
    if head is None:
        raise TypeError(
            f"{type(base).__name__} has no `score` head; a reward model or critic is loaded with "
            "AutoModelForSequenceClassification"
        )
    return head


def lm_loss_sums(call: Callable, batch: dict, sp: SPLayout) -> tuple[Tensor, Tensor]:
    """(loss_sum, n_tokens) of next-token cross entropy over a right-padded (B, T) batch with labels
    (-100 = no loss); packed batches carry position_ids. Under Ulysses: this rank's shard only."""
    if sp.enabled:
        local = shard_batch(batch, sp)
        return sharded_sft_loss(call(**sp_model_inputs(local)).logits, local["shift_labels"])
    if "position_ids" in batch:  # packed: transformers builds the block-diagonal mask from the restarts
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
        }
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return sft_loss(call(**inputs, use_cache=False).logits, batch["labels"])
