"""`TrainEngine`: one model under DeepSpeed (train or frozen), the only door trainers use to DeepSpeed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import deepspeed
import torch

from chatforge.config import EngineConfig, OptimConfig

from .distributed import DistInfo, init_distributed
from .ds_config import build_ds_config, torch_dtype
from .export import save_hf
from .optim import build_optimizer, build_scheduler
from .sequence_parallel import (
    enable_ulysses,
    full_sequence_attention,
    init_sequence_parallel,
    zero3_loss_factor,
)


@contextlib.contextmanager
def zero3_init(ds_config: dict, enabled: bool) -> Iterator[None]:
    """While active, transformers' from_pretrained/from_config build ZeRO-3 partitioned models.

    Unset afterwards so that later, differently configured models are not partitioned by accident.
    """
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


class TrainEngine:
    """A model wrapped by DeepSpeed with its optimizer and schedule (or frozen, when `optim` is None).

    `model_factory` builds the HF model; it runs inside the ZeRO-3 init context when needed, so
    parameters are sharded as they load instead of materialising the whole model on every rank.
    """

    def __init__(
        self,
        model_factory: Callable[[torch.dtype], torch.nn.Module],
        cfg: EngineConfig,
        optim: OptimConfig | None = None,
        *,
        micro_batch_size: int = 1,
        gradient_accumulation_steps: int = 1,
        total_steps: int = 1,
        trainable_heads: tuple[str, ...] = (),
        dist: DistInfo | None = None,
    ):
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.trainable = optim is not None
        self.dtype = torch_dtype(cfg.precision)
        self.ds_config = build_ds_config(cfg, micro_batch_size, gradient_accumulation_steps, self.trainable)
        self.sp = init_sequence_parallel(cfg.sequence_parallel_size, self.dist, self.trainable)
        self._loss_factor = zero3_loss_factor(self.ds_config, self.sp)
        with zero3_init(self.ds_config, cfg.zero_stage == 3):
            model = model_factory(self.dtype)
        if self.sp.enabled:
            enable_ulysses(model, self.sp)
        model = self._prepare(model, trainable_heads)
        optimizer = scheduler = None
        if self.trainable:
            optimizer = build_optimizer(model, optim, offload=cfg.offload_optimizer)
            scheduler = build_scheduler(optimizer, optim, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
            mpu=self.sp.mpu,  # with SP: average gradients over data-parallel groups, shard over all ranks
        )
        self.gather_count = 0
        self.train() if self.trainable else self.eval()

    def _prepare(self, model: torch.nn.Module, trainable_heads: tuple[str, ...]) -> torch.nn.Module:
        if self.cfg.gradient_checkpointing and self.trainable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.cfg.lora.enabled and self.trainable:
            from chatforge.models.lora import apply_lora

            model = apply_lora(model, self.cfg.lora, trainable_heads)
        if not self.trainable:
            model.requires_grad_(False)
        return model

    # --- the training step -------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The HF model (a peft model when LoRA is on); call it through the engine for training."""
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss; DeepSpeed divides by gradient_accumulation_steps."""
        self.ds.backward(loss * self._loss_factor if self._loss_factor != 1.0 else loss)

    def step(self) -> bool:
        """Count a micro step; at an accumulation boundary also update weights and lr. Returns
        True when the weights were updated."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.cfg.zero_stage == 0 and self.trainable:
            # DeepSpeed records the norm only for its own optimizers; at stage 0 the averaged gradients
            # sit on the parameters, so the pre-clipping norm is read here.
            self._stage0_grad_norm = _total_grad_norm(self.module)
        self.ds.step()
        return boundary

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else 0.0

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return getattr(self, "_stage0_grad_norm", None)
        return float(norm)

    @property
    def global_steps(self) -> int:
        return int(self.ds.global_steps)

    # --- gathering, export, checkpoints ---------------------------------------------------
    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """Gather all ZeRO-3 shards once (read-only) and yield the full module; a no-op below stage 3.

        Used for generation and export: one all-gather per call, not one per forward. Under sequence
        parallelism the module runs plain full-sequence attention inside the block.
        """
        self.gather_count += 1
        params = list(self.module.parameters()) if self.cfg.zero_stage == 3 else []
        with (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)),
            full_sequence_attention(self.module),
        ):
            yield self.module

    def save_hf(self, out_dir: str | Path, tokenizer=None, lora_save: str | None = None) -> Path:
        """Plain HF model dir (LoRA merged) or peft adapter dir; all ranks must call it."""
        mode = lora_save or self.cfg.lora.save
        return save_hf(self.module, out_dir, tokenizer, lora_save=mode, is_main=self.dist.is_main)

    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """Full training state (weights, optimizer, scheduler, client_state); DeepSpeed writes the
        `latest` pointer only after every shard is on disk, so a crash never points to half a checkpoint."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state or {})

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict | None:
        """Restore the latest (or `tag`) checkpoint; returns its client_state, None if there is none."""
        if tag is None and not (Path(ckpt_dir) / "latest").is_file():
            return None
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            return None
        return client_state or {}


def _total_grad_norm(module: torch.nn.Module) -> float | None:
    """L2 norm over every parameter gradient (None when no parameter has one)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None
