"""An exponential moving average of the actor's effective weights, written as a plain HF model dir.

ema <- decay * ema + (1 - decay) * W after every actor optimizer step (DeepSpeed-Chat's "EMA checkpoint"),
seeded with the starting (step-1) weights. W is the weight the model computes with: with LoRA, the merged
W0 + BA of each layer, since averaging A and B separately gives EMA(B) EMA(A), which is not EMA(BA). Only
tensors that can change are averaged. The averages live on the main rank only (fp32, on the weights'
device); under ZeRO-3 every rank takes part in the per-module gathers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .export import merged_tensors, save_state_dict


class EMA:
    def __init__(self, decay: float, module: torch.nn.Module, is_main: bool):
        self.decay, self.is_main = decay, is_main
        self.shadow: dict[str, torch.Tensor] = {
            name: value.float().clone()
            for name, value, trainable in merged_tensors(module, True, is_main)
            if trainable
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Fold the current weights in (collective under ZeRO-3: every rank calls it)."""
        for name, value, trainable in merged_tensors(module, True, self.is_main):
            if trainable:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = {k: v.device for k, v in self.shadow.items()}
        self.shadow = {k: v.to(device.get(k, v.device)).clone() for k, v in state.items()}

    @torch.no_grad()
    def save(self, module: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
        """Write the averaged model as a plain HF dir; every rank must call it."""
        state = {}
        for name, value, _ in merged_tensors(module, True, self.is_main):
            kept = self.shadow.get(name)
            state[name] = (value if kept is None else kept.to(value.dtype)).cpu().clone()
        return save_state_dict(module, state, out_dir, tokenizer, self.is_main, merged=True)
