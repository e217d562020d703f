"""Per-token values and sequence scores from a sequence-classification model (reward model, critic).

HF's own pooling finds the last token by searching for pad ids, which breaks with left padding and when
pad == eos. Here the last real token comes from the attention mask, so left and right padding agree.
The per-token outputs of the `score` head are read with a forward hook, so the model is still called
through its root forward (a DeepSpeed engine's included) and ZeRO-3's per-step bookkeeping holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .lora import base_model_of


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so a left-padded row sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1 (works for left and right padding)."""
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(base_model_of(model), "score", None)
    if head is None:
        raise TypeError(
            f"{type(base_model_of(model)).__name__} has no `score` head; load the reward/critic model with "
            "AutoModelForSequenceClassification (num_labels=1)"
        )
    return head


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(base_model_of(model).forward).parameters


def token_values(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    forward: Callable | None = None,
) -> torch.Tensor:
    """(B, T) the score head's output at every position (the critic's V(s_t)).

    `forward` is what to call (a TrainEngine for training); defaults to `model` itself."""
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    try:
        (forward or model)(**kwargs)
    finally:
        hook.remove()
    return captured[-1].squeeze(-1).float()


def sequence_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    forward: Callable | None = None,
) -> torch.Tensor:
    """(B,) the reward: the score head's output at each row's last real token."""
    values = token_values(model, input_ids, attention_mask, forward)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)
