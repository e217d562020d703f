"""LoRA through peft: wrap a model, and read merged weights of a LoRA layer for export."""

from __future__ import annotations

import torch

SCORE_HEADS = ("score",)


def apply_lora(model: torch.nn.Module, r: int, alpha: float, trainable_heads: tuple[str, ...] = ()):
    """Wrap `model` with peft LoRA adapters of rank `r` on every linear layer but the output head.
    `trainable_heads` (e.g. a reward model's `score`) are trained in full beside the adapters, since a fresh
    head cannot be learned through a low-rank delta. No LoRA dropout: RL ratios must not be noise."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        modules_to_save=list(trainable_heads) or None,
        exclude_modules=list(trainable_heads) or None,
    )
    return get_peft_model(model, peft_cfg)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model (inside peft's wrappers when LoRA is on)."""
    return model.get_base_model() if is_peft_model(model) else model
