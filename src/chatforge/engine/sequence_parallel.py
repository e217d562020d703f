"""Ulysses sequence parallelism (Jacobs et al. 2023, arXiv:2309.14509) for Hugging Face models.

Each sample is split along the sequence over the P ranks of a sequence-parallel (SP) group. Before
attention, DeepSpeed's `DistributedAttention` all-to-alls the sequence-split Q, K, V into head-split
full-sequence ones, runs attention per head, and all-to-alls the output back to the sequence split.
Ranks form data-parallel x sequence-parallel groups (DeepSpeed's `parallel_state_sp` layout: the P
ranks of an SP group are consecutive), and DeepSpeed reduces gradients and shards ZeRO state over
all of them.

Why not DeepSpeed's `UlyssesSPAttentionHF.register_with_transformers`: it replaces the process-wide
`sdpa` attention with one wrapper built for a single head count and micro-batch size. PPO keeps
several models in one process (actor, critic, reference, reward) and generates with a KV cache, and
reward batches (chosen + rejected) and short eval batches change the batch size. So this module
registers its own attention key, switched on per model through `config._attn_implementation`, and
calls `DistributedAttention` (any batch size, GQA aware) from it.

Typical use (trainers do this through `TrainEngine`, which sets the model and DeepSpeed up)::

    sp = init_sequence_parallel(2, dist)        # groups; dp_rank / dp_world_size for the data order
    local = shard_batch(batch, sp)              # (B, T) -> (B, T/P) shards, global position ids
    logits = engine(**sp_model_inputs(local)).logits           # (B, T/P, V)
    loss_sum, n = sharded_sft_loss(logits, local["shift_labels"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from chatforge.config import ConfigError
from chatforge.data.tokenize import IGNORE_INDEX

from .distributed import DistInfo

ATTN_KEY = "chatforge_ulysses"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_ORIGINAL_ATTN = "_chatforge_attn_before_sp"
# Extra forward kwarg (transformers passes unknown kwargs down to the attention function): the
# (B, T) global padding mask, sent only when some row is not right-padded.
KEY_MASK_KWARG = "sp_key_padding_mask"


class SequenceParallelError(ConfigError):
    """A model, batch or layout that Ulysses sequence parallelism cannot split."""


@dataclass(frozen=True)
class SPLayout:
    """This rank's place in the data-parallel x sequence-parallel grid.

    `size` ranks share each sample (rank `sp_rank` holds its `sp_rank`-th sequence shard);
    `dp_world_size` groups see different samples. `mpu` is DeepSpeed's parallel-state module, passed
    to `deepspeed.initialize` so gradients are averaged over data-parallel groups only.
    """

    size: int
    sp_rank: int
    dp_rank: int
    dp_world_size: int
    group: Any = None
    mpu: Any = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def data_parallel(self, dist: DistInfo) -> DistInfo:
        """`dist` seen along the data-parallel axis: what row-dealing helpers should use."""
        return DistInfo(self.dp_rank, self.dp_world_size, dist.local_rank, dist.device)


_DIST_ATTN: Any = None  # DeepSpeed DistributedAttention over this process's SP group


def init_sequence_parallel(size: int, dist: DistInfo, trainable: bool = True) -> SPLayout:
    """Create (once per process) the SP and SP x DP process groups and return this rank's layout.

    Idempotent: every engine of a process must use the same SP size (DeepSpeed keeps one global
    layout, and it averages the gradients of every later engine by it).
    """
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    current = mpu._SEQUENCE_PARALLEL_GROUP
    if size <= 1:
        if current is not None and trainable and mpu.get_sequence_parallel_world_size() > 1:
            raise SequenceParallelError(
                "engine.sequence_parallel_size=1 for a trained model, but this process already uses "
                f"sequence_parallel_size={mpu.get_sequence_parallel_world_size()}; DeepSpeed keeps one "
                "layout per process, so give every trained model the same sequence_parallel_size"
            )
        return SPLayout(1, 0, dist.rank, dist.world_size)
    _check_world(size, dist.world_size)
    if current is None:
        mpu.initialize_sequence_parallel(size)
    elif mpu.get_sequence_parallel_world_size() != size:
        raise SequenceParallelError(
            f"engine.sequence_parallel_size={size}, but this process already uses "
            f"{mpu.get_sequence_parallel_world_size()}; every model in one process needs the same size"
        )
    global _DIST_ATTN
    if _DIST_ATTN is None:
        from deepspeed.sequence.layer import DistributedAttention

        # [B, T, H, D] layout: scatter heads (dim 2), gather the sequence (dim 1).
        _DIST_ATTN = DistributedAttention(_local_attention, mpu.get_sequence_parallel_group(), 2, 1)
        _register_attention()
    return SPLayout(
        size, mpu.get_sequence_parallel_rank(), dist.rank // size, dist.world_size // size,
        mpu.get_sequence_parallel_group(), mpu,
    )  # fmt: skip


def _check_world(size: int, world: int) -> None:
    if world % size != 0:
        raise SequenceParallelError(
            f"engine.sequence_parallel_size={size} must divide the number of processes ({world}); "
            f"launch a multiple of {size} processes or change sequence_parallel_size"
        )


def zero3_loss_factor(ds_config: dict, layout: SPLayout) -> float:
    """The factor TrainEngine multiplies every loss by so that gradients are averaged over data-parallel
    groups only, as in ZeRO 0-2; forces the reduce-scatter path so one factor holds for every bucket.

    DeepSpeed 0.19's ZeRO-3 reduce-scatter (`stage3.__avg_scatter_grads` -> `reduce_scatter_coalesced`)
    divides by the whole SP x DP group, not by its size / P as its other reductions do, so without
    this the gradients come out P times too small (tests/engine/test_sequence_parallel.py checks it).
    """
    zero = ds_config.get("zero_optimization", {})
    if not layout.enabled or zero.get("stage") != 3:
        return 1.0
    zero["reduce_scatter"] = True
    return float(layout.size)


# --- the model side ---------------------------------------------------------------------------
def check_model(model: torch.nn.Module, size: int) -> None:
    """Raise SequenceParallelError if `model` cannot be split over `size` ranks (family, heads, windows)."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise SequenceParallelError(
            f"sequence parallelism supports the model families {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got {kind!r}. Set engine.sequence_parallel_size=1 for this model"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise SequenceParallelError(
            f"engine.sequence_parallel_size={size} must divide the attention heads ({heads}) and the "
            f"key/value heads ({kv_heads}) of {kind}; Ulysses gives every rank whole heads"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise SequenceParallelError(
            f"{kind} uses sliding-window attention, which sequence parallelism does not support; "
            "set use_sliding_window=false or engine.sequence_parallel_size=1"
        )


def enable_ulysses(model: torch.nn.Module, layout: SPLayout) -> None:
    """Route `model`'s attention through Ulysses (after loading; other models are not affected)."""
    check_model(model, layout.size)
    config = model.config
    if config._attn_implementation != ATTN_KEY:
        setattr(model, _ORIGINAL_ATTN, config._attn_implementation)
        config._attn_implementation = ATTN_KEY


@contextlib.contextmanager
def full_sequence_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, `model` runs plain attention on whole sequences (generation, export).

    A no-op for models without Ulysses."""
    config = model.config
    original = _find_original_attn(model)
    if original is None or config._attn_implementation != ATTN_KEY:
        yield model
        return
    config._attn_implementation = original
    try:
        yield model
    finally:
        config._attn_implementation = ATTN_KEY


def _find_original_attn(model: torch.nn.Module) -> str | None:
    """The attention implementation `model` had before `enable_ulysses` (peft/DS wrappers looked through)."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL_ATTN):
            return getattr(module, _ORIGINAL_ATTN)
    return None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_KEY, _ulysses_attention)


def _ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; q (B, H, T/P, D), k/v (B, Hkv, T/P, D).

    Returns (B, T/P, H, D). transformers builds no mask for an unknown attention key, so
    `attention_mask` is None; padding that causal attention cannot ignore comes in KEY_MASK_KWARG.
    """
    kwargs.pop("position_ids", None)  # RoPE is already applied; sdpa does not read them
    key_mask = kwargs.pop(KEY_MASK_KWARG, None)
    out = _DIST_ATTN(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0,
        module=module, key_mask=key_mask, **kwargs,
    )  # fmt: skip
    return out, None


def _local_attention(q, k, v, *, module, key_mask=None, **kwargs) -> torch.Tensor:
    """Attention of this rank's heads over the whole sequence: q (B, T, H/P, D) -> (B, T, H/P, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = None if key_mask is None else _causal_padding_mask(key_mask, q.shape[1])
    out, _ = sdpa_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, **kwargs
    )
    return out


def _causal_padding_mask(key_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and key is a real token. Only built for left/inner padding.

    A query that sees no key at all (a left pad) sees every key instead, as transformers does, so it
    yields finite junk instead of NaN (its output is never used, but NaN would poison gradients)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=key_mask.device).tril()
    mask = causal[None, None] & key_mask[:, None, None, :length].bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


# --- the batch side -----------------------------------------------------------------------------
def reject_packing(packing: bool, layout: SPLayout) -> None:
    if packing and layout.enabled:
        raise SequenceParallelError(
            "data.packing=true is not supported with engine.sequence_parallel_size > 1 (packed rows "
            "need a block-diagonal mask that Ulysses' causal attention does not apply); set "
            "data.packing=false"
        )


def shard_batch(batch: dict[str, torch.Tensor], layout: SPLayout) -> dict[str, torch.Tensor]:
    """This rank's sequence shard of a (B, T) batch; every rank of an SP group must pass the same batch.

    T is right-padded to Tp, a multiple of P (ids 0, masks 0, labels -100). Returns (B, Tp/P) shards of
    every (B, T, ...) tensor, other values unchanged, plus:
      - position_ids: global positions of the shard (counting only real tokens, as for left padding);
      - shift_labels: labels[t + 1] (the next-token shift happens before the split, so a shard's last
        token still gets its label); `labels` itself is dropped;
      - shift_input_ids: input_ids[t + 1] (for next-token log-probs);
      - sp_full_attention_mask: (B, Tp) the whole padded mask (for last-token indices);
      - sp_key_padding_mask: (B, Tp), only when a row has padding before a real token.
    """
    if "position_ids" in batch:
        raise SequenceParallelError(
            "this batch carries position_ids (a packed batch); sequence parallelism needs unpacked rows"
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    width = -(-ids.shape[1] // layout.size) * layout.size
    full = {k: _pad_to(v, width, _pad_value(k)) for k, v in batch.items() if _is_token_tensor(v, ids)}
    full["attention_mask"] = _pad_to(mask, width, 0)
    full["position_ids"] = (full["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    if "labels" in full:
        full["shift_labels"] = _shift_left(full.pop("labels"), IGNORE_INDEX)
    full["shift_input_ids"] = _shift_left(full["input_ids"], 0)
    local = {k: v for k, v in batch.items() if k not in full and k != "labels"}  # e.g. (B,) rewards
    local.update({k: _shard(v, layout) for k, v in full.items()})
    local["sp_full_attention_mask"] = full["attention_mask"]
    if not _right_padded(full["attention_mask"]):
        local[KEY_MASK_KWARG] = full["attention_mask"].bool()
    return local


def _is_token_tensor(value, ids: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == ids.shape


def _pad_value(key: str) -> int:
    return IGNORE_INDEX if key == "labels" else 0


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra, *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def _shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1, *x.shape[2:]), fill)], dim=1)


def _shard(x: torch.Tensor, layout: SPLayout) -> torch.Tensor:
    return x.chunk(layout.size, dim=1)[layout.sp_rank].contiguous()


def _right_padded(mask: torch.Tensor) -> bool:
    """True when every row is real tokens then padding: causal attention alone is then exact."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def sp_model_inputs(local: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward kwargs for a sharded batch: ids and global positions; no 2D mask (see module doc)."""
    kwargs: dict[str, Any] = {
        "input_ids": local["input_ids"],
        "position_ids": local["position_ids"],
        "attention_mask": None,
        "use_cache": False,
    }
    if KEY_MASK_KWARG in local:
        kwargs[KEY_MASK_KWARG] = local[KEY_MASK_KWARG]
    return kwargs


# --- losses and reductions over the SP group -------------------------------------------------------
def sharded_sft_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy of one shard: logits (B, T/P, V), shift_labels (B, T/P) (already shifted).

    Returns (loss_sum, n_tokens) of this shard; summing both over all ranks (SP and DP) gives the
    global sums, each token counted once, like `sft_loss` does over data-parallel ranks."""
    flat_labels = shift_labels.reshape(-1)
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (flat_labels != IGNORE_INDEX).sum()


class _GatherSequence(torch.autograd.Function):
    """All-gather shards along dim 1. Backward keeps this rank's slice of the gradient (no sum):
    exact when every SP rank computes the same loss from the gathered tensor, because then each
    rank's copy of dL/dx is already the full gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.width = rank, local.shape[1]
        parts = [torch.empty_like(local) for _ in range(size)]
        tdist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.rank * ctx.width
        return grad[:, start : start + ctx.width], None, None, None


def gather_sequence(local: torch.Tensor, layout: SPLayout, length: int | None = None) -> torch.Tensor:
    """(B, T/P, ...) shards -> (B, T, ...) on every SP rank, trimmed to `length` (the unpadded T).

    Differentiable; every SP rank must then compute the same loss from the result (see
    `_GatherSequence`), e.g. PPO's losses on gathered log-probs and values."""
    full = (
        local
        if not layout.enabled
        else _GatherSequence.apply(local, layout.group, layout.size, layout.sp_rank)
    )
    return full if length is None else full[:, :length]


def sp_all_reduce(values: torch.Tensor, layout: SPLayout) -> torch.Tensor:
    """Sum over the SP group only (no autograd), e.g. per-shard statistics; identity when SP is off."""
    out = values.detach().clone()
    if layout.enabled:
        tdist.all_reduce(out, group=layout.group)
    return out


def gather_rows(x: torch.Tensor, layout: SPLayout, pad_value: float = 0) -> torch.Tensor:
    """(b_r, L_r, ...) rows of each SP rank -> (sum of b_r, max L_r, ...) on every rank of the group, in
    SP-rank order, dim 1 right padded with `pad_value` (1-D tensors are only concatenated).

    Step 3 under Ulysses: each rank of a group samples part of the group's rollouts (generation runs on
    whole sequences), then every rank holds all of them, as its sharded training forwards need."""
    if not layout.enabled:
        return x
    shape = torch.tensor([x.shape[0], x.shape[1] if x.dim() > 1 else 0], device=x.device)
    sizes = [torch.empty_like(shape) for _ in range(layout.size)]
    tdist.all_gather(sizes, shape, group=layout.group)
    rows, width = max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)
    padded = x.new_full((rows, *([width] if x.dim() > 1 else []), *x.shape[2:]), pad_value)
    if x.dim() > 1:
        padded[: x.shape[0], : x.shape[1]] = x
    else:
        padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(layout.size)]
    tdist.all_gather(parts, padded.contiguous(), group=layout.group)
    return torch.cat([p[: int(s[0])] for p, s in zip(parts, sizes)])
