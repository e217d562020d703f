"""An exponential moving average of a model's trainable weights, written as a plain HF model dir.

ema <- decay * ema + (1 - decay) * w after every optimizer step (the "EMA checkpoint" of DeepSpeed-Chat
step 3). Only trainable tensors are averaged: frozen ones (a LoRA base) equal their own average. The
averages are full tensors (on CPU with `on_cpu`); under ZeRO-3 each update reads the weights inside the
engine's one-shot gather, so it costs one gather per optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .lora import is_peft_model

GatherFn = Callable[[], contextlib.AbstractContextManager[nn.Module]]


class EMA:
    def __init__(self, decay: float, on_cpu: bool = False):
        self.decay = decay
        self.on_cpu = on_cpu
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, gathered: GatherFn) -> None:
        """Fold the current weights in; `gathered` yields the full module (e.g. `engine.gathered`)."""
        with gathered() as model:
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                current = param.detach().to("cpu" if self.on_cpu else param.device, torch.float32)
                if name not in self.shadow:
                    self.shadow[name] = current.clone()
                    continue
                if self.shadow[name].device != current.device:  # restored from a CPU checkpoint
                    self.shadow[name] = self.shadow[name].to(current.device)
                self.shadow[name].lerp_(current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}

    @torch.no_grad()
    def save(self, gathered: GatherFn, out_dir: str | Path, tokenizer=None, is_main: bool = True) -> None:
        """Write the averaged model as a plain HF dir (LoRA merged); every rank must call it."""
        with gathered() as model:
            state = self._full_state(model) if is_main else {}
            if is_main:
                _write_plain_model(model, state, Path(out_dir), tokenizer)

    def _full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of `model` on CPU, the averaged value where one exists."""
        state = {}
        for name, param in model.named_parameters():
            value = self.shadow.get(name, param.detach())
            state[name] = value.to("cpu", param.dtype).clone()
        return state


def _write_plain_model(model: nn.Module, state: dict[str, torch.Tensor], out: Path, tokenizer) -> None:
    """Rebuild `model`'s architecture on CPU, load `state` (peft names when LoRA), merge and save."""
    if is_peft_model(model):
        from peft import get_peft_model

        base = model.get_base_model()
        copy = get_peft_model(type(base)(base.config), model.peft_config[model.active_adapter])
    else:
        copy = type(model)(model.config)
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"EMA state does not fit the model: unexpected keys {unexpected[:5]}")
    if is_peft_model(copy):
        copy = copy.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    copy.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
