"""Deployment types: documented presets of processes, ZeRO stages, offload and LoRA, plus `auto`,
which sizes the run from the models' parameter counts and the memory it measures."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Deployment:
    name: str
    processes: int
    launcher: str  # "none" | "torchrun" | "deepspeed"
    actor_zero: int
    reward_zero: int
    offload: bool
    lora_r: int
    reason: str


# Bytes per trained parameter with AdamW: weights + grads + 2 moments (+ fp32 master in mixed precision).
TRAIN_BYTES = {"fp32": 16, "bf16": 18}
FROZEN_BYTES = {"fp32": 4, "bf16": 2}
HEADROOM = 0.6  # keep 40% for activations, KV cache and fragmentation


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def preset(name: str, gpus: int) -> Deployment:
    """The fixed presets (the table in docs/pipeline.md)."""
    if name == "cpu":
        return Deployment("cpu", 1, "none", 0, 0, False, 0, "CPU preset: one process, fp32, no sharding")
    if name == "single_gpu":
        return Deployment(
            "single_gpu", 1, "none", 2, 2, True, 0, "one GPU, ZeRO-2 with optimizer offload to CPU"
        )
    if name == "single_node":
        n = max(gpus, 1)
        return Deployment("single_node", n, "torchrun", 2, 2, False, 0, f"{n} GPUs on this node, ZeRO-2")
    if name == "multi_node":
        return Deployment("multi_node", max(gpus, 1), "deepspeed", 3, 3, False, 0, "hostfile nodes, ZeRO-3")
    raise ValueError(f"unknown deployment type {name!r}")


def count_parameters(name_or_path: str, trust_remote_code: bool = False) -> int:
    """Parameters of a model from its config alone (built on the meta device: no weights loaded)."""
    from chatforge.models.sources import ModelLoadError, check_model_source

    check_model_source(
        name_or_path, trust_remote_code
    )  # before the heavy imports: a wrong path fails in a second
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read the config of {name_or_path!r} to size the run: {str(exc).splitlines()[0]}"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _train_bytes(params: int, stage: int, n: int, precision: str) -> float:
    """Per-process memory of a trained model under a ZeRO stage (weights, grads, optimizer states)."""
    per = TRAIN_BYTES[precision]
    weights = FROZEN_BYTES[precision]
    grads = weights
    optim = per - weights - grads
    if stage == 0:
        return params * per
    if stage == 1:
        return params * (weights + grads + optim / n)
    if stage == 2:
        return params * (weights + (grads + optim) / n)
    return params * per / n


def step3_bytes(
    actor: int, reward: int, actor_stage: int, reward_stage: int, n: int, precision: str
) -> float:
    """Step 3 holds the most: trained actor + critic, frozen reference + reward model."""
    frozen = FROZEN_BYTES[precision]
    ref = actor * frozen / (n if actor_stage == 3 else 1)
    rm = reward * frozen / (n if reward_stage == 3 else 1)
    train = _train_bytes(actor, actor_stage, n, precision) + _train_bytes(reward, reward_stage, n, precision)
    return train + ref + rm


def auto(actor_params: int, reward_params: int, gpus: int, gpu_bytes: int, ram_bytes: int) -> Deployment:
    """The cheapest plan whose step-3 footprint fits the measured memory, with the reason."""
    gib = 2**30
    if gpus == 0:
        need = step3_bytes(actor_params, reward_params, 0, 0, 1, "fp32")
        verdict = (
            "fits" if need < HEADROOM * ram_bytes else "may NOT fit (consider LoRA: reward/actor lora.r)"
        )
        return Deployment(
            "cpu", 1, "none", 0, 0, False, 0,
            f"no GPU; step 3 needs ~{need / gib:.2f} GiB of {ram_bytes / gib:.1f} GiB RAM ({verdict})",
        )  # fmt: skip
    budget = HEADROOM * gpu_bytes
    launcher = "none" if gpus == 1 else "torchrun"
    for stage in (0, 1, 2, 3):
        need = step3_bytes(actor_params, reward_params, stage, stage, gpus, "bf16")
        if need < budget:
            why = (
                f"{gpus} GPU(s) x {gpu_bytes / gib:.0f} GiB; ZeRO-{stage} needs ~{need / gib:.1f} GiB per GPU"
            )
            return Deployment("auto", gpus, launcher, stage, stage, False, 0, why)
    # Offloaded optimizer states leave bf16 weights (+ gradient shards) on the GPU.
    need = (actor_params + reward_params) * 2 * 2 / gpus
    if need < budget:
        return Deployment(
            "auto", gpus, launcher, 3, 3, True, 0, f"ZeRO-3 + CPU offload: ~{need / gib:.1f} GiB per GPU"
        )
    return Deployment(
        "auto", gpus, launcher, 3, 3, True, 64,
        f"even ZeRO-3 + offload needs ~{need / gib:.1f} GiB per GPU: LoRA (r=64) on top",
    )  # fmt: skip


def measured_memory() -> tuple[int, int]:
    """(free bytes on the first GPU or 0, total RAM bytes)."""
    import torch

    gpu = torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else 0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpu, ram


def choose(
    name: str,
    actor_model: str,
    reward_model: str,
    num_processes: int | None = None,
    trust_remote_code: bool = False,
) -> Deployment:
    """The preset `name` (or the measured `auto` plan); `num_processes` overrides its process count (several
    processes on a single-process preset run under torchrun)."""
    import dataclasses

    gpus = gpu_count() if name in ("auto", "single_node", "multi_node") else 0  # torch: 3 s to import
    if name != "auto":
        dep = preset(name, gpus)
    else:
        gpu_bytes, ram_bytes = measured_memory()
        params = [count_parameters(m, trust_remote_code) for m in (actor_model, reward_model)]
        dep = auto(*params, gpus, gpu_bytes, ram_bytes)
    if num_processes is None or num_processes == dep.processes:
        return dep
    launcher = dep.launcher if dep.launcher != "none" or num_processes == 1 else "torchrun"
    return dataclasses.replace(
        dep, processes=num_processes, launcher=launcher, reason=f"{dep.reason}; num_processes={num_processes}"
    )
