"""Derive a DeepSpeed config dict from a `ModelSpec` (or merge a user's JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatforge.config import ConfigError
from chatforge.config.loader import deep_update

from .spec import ModelSpec


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on GPUs that support it and on CPUs with native bf16 matmuls, else fp32 (fp16 is
    refused on CPU). Training in bf16 keeps fp32 master weights (DeepSpeed's bf16 optimizer)."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("engine.precision=fp16 is not supported on CPU; use fp32 (or bf16)")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX, AVX512-BF16), where bf16 matmuls run several
    times faster than fp32; on AVX2-only CPUs bf16 is emulated and ~12x slower (STACK-NOTES)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        resolve_precision(precision)
    ]


def build_ds_config(spec: ModelSpec, micro_batch_size: int, gradient_accumulation_steps: int) -> dict:
    """The DeepSpeed config for one model. The optimizer is passed as a torch object, never named here:
    naming one makes DeepSpeed build FusedAdam (minutes on CPU). At ZeRO-0 the engine clips gradients itself
    (one norm pass that also gives the logged norm), so DeepSpeed's clipping is off there."""
    precision = resolve_precision(spec.precision)
    train = spec.trainable
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage >= 1 and spec.offload and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if spec.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # Small models: keep tiny params resident instead of re-gathering them every forward.
        zero["stage3_param_persistence_threshold"] = 10_000
        if spec.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    clip = spec.gradient_clipping if train and spec.zero_stage > 0 else 0.0
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if spec.deepspeed_config:
        deep_update(ds, load_user_config(spec.deepspeed_config))
    return ds


def load_user_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"engine.deepspeed_config: {p} does not exist")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"engine.deepspeed_config: {p} is not valid JSON ({exc})") from None
    if "optimizer" in user:
        raise ConfigError(
            f"engine.deepspeed_config: {p} names an optimizer; remove the 'optimizer' block "
            "(chatforge passes AdamW / DeepSpeedCPUAdam itself and sets the learning rate per model)"
        )
    # Batch sizes come from the command's batch settings; a stale train_batch_size would contradict them.
    user.pop("train_batch_size", None)
    return user
