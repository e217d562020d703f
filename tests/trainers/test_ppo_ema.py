"""The actor EMA: the average follows ema = d * ema + (1 - d) * w, and the saved HF dir holds it (LoRA merged)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from chatforge.config import LoRAConfig, ModelConfig
from chatforge.models.ema import EMA
from chatforge.models.loading import load_causal_lm


def _shift_trainable(model, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(amount)


@pytest.mark.parametrize("lora", [0, 4])
def test_ema_average_and_saved_model(fixture_dir, tmp_path, lora):
    from chatforge.models.lora import apply_lora, is_peft_model

    model = load_causal_lm(ModelConfig(str(fixture_dir / "llama")), torch.float32)
    if lora:
        model = apply_lora(model, LoRAConfig(r=lora))
    gathered = lambda: contextlib.nullcontext(model)  # noqa: E731 - a plain model needs no gather
    ema = EMA(decay=0.75, on_cpu=True)
    ema.update(gathered)  # ema = w0
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _shift_trainable(model, 1.0)
    ema.update(gathered)  # ema = 0.75 w0 + 0.25 (w0 + 1) = w0 + 0.25
    for name, w0 in start.items():
        torch.testing.assert_close(ema.shadow[name], w0 + 0.25)
    ema.save(gathered, tmp_path / "ema")

    # The expected model: the trainable weights at w0 + 0.25, LoRA merged into a plain HF model.
    _shift_trainable(model, -0.75)
    expected = model.merge_and_unload() if is_peft_model(model) else model
    saved = load_causal_lm(ModelConfig(str(tmp_path / "ema")), torch.float32)
    ids = torch.arange(10, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, expected(input_ids=ids).logits)
