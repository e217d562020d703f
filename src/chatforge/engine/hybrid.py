"""The actor's inference mode (a "hybrid engine" without DeepSpeed's CUDA-only kernels).

`with inference_mode(engine) as model:` puts a training actor into the state fast rollouts need:
eval, no grad, ZeRO-3 shards gathered ONCE, DeepSpeed's per-module ZeRO-3 hooks bypassed (inside
`GatheredParameters` they would still release every layer after its forward and re-gather it on the
next token: DeepSpeed-Chat's 70x-slower generation), and LoRA merged into the base weights. On exit the
exact training weights are restored (bit for bit), shards are released, and the engine goes back to
training mode with generation memory freed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch import nn

from .train_engine import TrainEngine


def _is_deepspeed_hook(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("deepspeed")


@contextlib.contextmanager
def zero3_hooks_bypassed(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Detach DeepSpeed's forward hooks from every submodule while active, then put them back in order.

    Only valid while every parameter is gathered: the forward then runs on the full weights with no
    fetch/release bookkeeping and no collectives, so ranks may run different numbers of forwards.
    """
    saved: list[tuple[dict, dict]] = []
    if enabled:
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                if any(_is_deepspeed_hook(h) for h in hooks.values()):
                    saved.append((hooks, dict(hooks)))
                    for key in [k for k, h in hooks.items() if _is_deepspeed_hook(h)]:
                        del hooks[key]
    try:
        yield
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_merged(model: nn.Module) -> Iterator[None]:
    """Merge LoRA adapters into the base weights while active (one matmul per layer instead of three).

    Unmerging subtracts the delta again, which is not exact in floating point, so the base weights are
    copied before the merge and restored after it: the training weights come back bit-identical.
    """
    from chatforge.models.lora import is_peft_model

    if not is_peft_model(model):
        yield
        return
    layers = _lora_layers(model)
    backup = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, backup):
                layer.get_base_layer().weight.copy_(weight)


def release_memory() -> None:
    """Return generation buffers (KV cache, gathered weights) to the device between phases.

    Only on accelerators, whose caching allocator keeps freed blocks: on CPU, refcounting already frees
    the cache when the rollout ends, and a full `gc.collect()` costs ~0.35 s per rollout."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def inference_mode(engine: TrainEngine) -> Iterator[nn.Module]:
    """Yield the actor's full HF module ready for `chatforge.generation.generate`; restore training after.

    Collectives happen only on entry (one gather) and exit, never per token: every rank must enter and
    leave together, but may generate different numbers of tokens in between.
    """
    engine._set_mode(False)
    try:
        with (
            torch.no_grad(),
            engine.gathered() as model,
            zero3_hooks_bypassed(model, enabled=engine.spec.zero_stage == 3),
            lora_merged(model),
        ):
            yield model
    finally:
        release_memory()
