"""`TrainEngine`: one model under DeepSpeed (trained or frozen), the only door trainers use to it.

The engine owns forward semantics. Its verbs (`logprobs`, `values`, `scores`, `lm_loss`) pick the mode
(train mode only for forwards that build a graph, eval otherwise), position ids, the response slice,
padding side and Ulysses sharding; trainers never call the module directly. A model trained without dropout
(RL, DPO, and SFT/RM unless asked) has it removed at load, and `check_no_dropout` proves two training-mode
forwards agree before the first step, so old log-probs, reference log-probs and values are never noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import deepspeed
import torch
from torch import Tensor

from .distributed import DistInfo, init_distributed
from .ds_config import build_ds_config, torch_dtype
from .export import save_hf
from .forward import lm_loss_sums, next_token_logprobs, response_logprobs, token_values
from .optim import build_optimizer, build_scheduler
from .sequence_parallel import (
    enable_ulysses,
    full_sequence_attention,
    init_sequence_parallel,
    zero3_loss_factor,
)
from .spec import ModelSpec


class DropoutStillActive(RuntimeError):
    """Training-mode forwards of a model that must have no dropout disagree."""


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
    """A model wrapped by DeepSpeed with its optimizer and schedule (or frozen: `spec.learning_rate` None).

    `model_factory(dtype)` builds the HF model; it runs inside the ZeRO-3 init context when needed, so
    parameters are sharded as they load instead of materialising the whole model on every rank.
    """

    def __init__(
        self,
        model_factory: Callable[[torch.dtype], torch.nn.Module],
        spec: ModelSpec,
        *,
        micro_batch_size: int = 1,
        gradient_accumulation_steps: int = 1,
        total_steps: int = 1,
        trainable_heads: tuple[str, ...] = (),
        dist: DistInfo | None = None,
    ):
        self.spec = spec
        self.dist = dist or init_distributed()
        self.trainable = spec.trainable
        self.dtype = torch_dtype(spec.precision)
        self.ds_config = build_ds_config(spec, micro_batch_size, gradient_accumulation_steps)
        self.sp = init_sequence_parallel(spec.sequence_parallel_size, self.dist, self.trainable)
        self._loss_factor = zero3_loss_factor(self.ds_config, self.sp)
        with zero3_init(self.ds_config, spec.zero_stage == 3):
            model = model_factory(self.dtype)
        if self.sp.enabled:
            enable_ulysses(model, self.sp)
        model = self._prepare(model, trainable_heads)
        optimizer = scheduler = None
        if self.trainable:
            optimizer = build_optimizer(model, spec)
            scheduler = build_scheduler(optimizer, spec, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
            mpu=self.sp.mpu,  # with SP: average gradients over data-parallel groups, shard over all ranks
        )
        if spec.zero_stage == 0 and self.dist.world_size == 1:
            # Nothing to reduce over one process: skip DeepSpeed's flatten / all-reduce / copy-back per step.
            self.ds.enable_backward_allreduce = False
        self._training: bool | None = None
        self._grad_norm: float | None = None
        self._set_mode(False)
        if self.trainable and not spec.dropout:
            self.check_no_dropout()

    def _prepare(self, model: torch.nn.Module, trainable_heads: tuple[str, ...]) -> torch.nn.Module:
        if self.spec.gradient_checkpointing and self.trainable:
            # transformers renamed it activation checkpointing (the old name warns a FutureWarning and goes in
            # v6); older releases only have the old name.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.spec.lora_r and self.trainable:
            from chatforge.models.lora import apply_lora

            model = apply_lora(model, self.spec.lora_r, self.spec.lora_alpha, trainable_heads)
        if not self.trainable:
            model.requires_grad_(False)
        return model

    # --- forward semantics ----------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The HF model (a peft model when LoRA is on). Trainers use the verbs below, not this."""
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def _set_mode(self, training: bool) -> None:
        """Train mode only for a trained model's forwards that build a graph (gradient checkpointing and,
        where kept, dropout act only there); every other forward runs in eval mode."""
        training = training and self.trainable
        if training != self._training:
            self.ds.train(training)
            self._training = training

    def _call(self, **kwargs):
        self._set_mode(torch.is_grad_enabled())
        return self.ds(**kwargs)

    def __call__(self, **kwargs):
        """A raw forward in the mode the grad state implies (tests and benchmarks; trainers use the verbs)."""
        return self._call(**kwargs)

    def logprobs(
        self, sequences: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float = 1.0,
        *, base: bool = False, with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """(B, A) log pi(a_t | s_t) of the response tokens sequences[:, prompt_len:] at `temperature`, and
        (B, A) entropies when asked. sequences, attention_mask `(B, P + A)`, left padded. `base=True`
        disables LoRA adapters: the frozen base (the reference policy of a LoRA actor)."""
        with self._adapters(enabled=not base):
            return response_logprobs(
                self._call,
                self.module,
                sequences,
                attention_mask,
                prompt_len,
                temperature,
                self.sp,
                with_entropy,
            )

    def sequence_logprobs(
        self, sequences: Tensor, attention_mask: Tensor, loss_mask: Tensor, *, base: bool = False
    ) -> Tensor:
        """(B,) sum of log p(x_t | x_<t) over the positions where `loss_mask` (B, T) is 1 (any padding side).
        `base=True` disables LoRA adapters (DPO's reference when the policy is LoRA)."""
        with self._adapters(enabled=not base):
            logp = next_token_logprobs(self._call, self.module, sequences, attention_mask, self.sp)
        return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(1)

    def values(self, sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
        """(B, A) V(s_t): the value head's output at the state before each response token (one head)."""
        values = token_values(self._call, self.module, sequences, attention_mask, self.sp)
        return values[:, prompt_len - 1 : -1, 0]

    def scores(self, sequences: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, H) each score head's output at each row's last real token (left or right padding)."""
        from chatforge.algorithms import last_one_index

        values = token_values(self._call, self.module, sequences, attention_mask, self.sp)
        last = last_one_index(attention_mask).clamp(min=0).to(values.device)
        return values[torch.arange(values.shape[0], device=values.device), last]

    def lm_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(loss_sum, n_tokens) of next-token cross entropy over a right-padded batch with labels; under
        Ulysses this rank's sequence shard. Summing both over ranks gives the token-weighted mean."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return lm_loss_sums(self._call, batch, self.sp)

    @contextlib.contextmanager
    def _adapters(self, enabled: bool) -> Iterator[None]:
        if enabled or not self.spec.lora_r or not self.trainable:
            yield
            return
        with self.module.disable_adapter():
            yield

    @torch.no_grad()
    def check_no_dropout(self, length: int = 8) -> None:
        """Two training-mode forwards of one fixed input must agree (dropout would make them differ by the
        size of the activations; kernel nondeterminism by ~1e-6). Raises DropoutStillActive otherwise."""
        length = -(-length // self.sp.size) * self.sp.size
        ids = torch.arange(3, 3 + length, device=self.device).remainder(8) + 3
        mask = torch.ones_like(ids)[None]
        self._set_mode(True)
        try:
            first, second = (self._probe(ids[None], mask) for _ in range(2))
        finally:
            self._set_mode(False)
        diff = float((first - second).abs().max())
        if diff > 1e-3 * (1.0 + float(first.abs().max())):
            raise DropoutStillActive(
                f"{self.spec.name_or_path}: two training-mode forwards differ by {diff:.3g}: some dropout of "
                f"this model family is still active after chatforge removed it; please report the family "
                f"({type(self.module).__name__})"
            )

    def _probe(self, ids: Tensor, mask: Tensor) -> Tensor:
        from chatforge.models.lora import base_model_of

        if hasattr(base_model_of(self.module), "score"):
            return token_values(self.ds, self.module, ids, mask, self.sp)
        return response_logprobs(self.ds, self.module, ids, mask, 1, 1.0, self.sp, False)[0]

    # --- the training step ------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        """Backward of a micro-batch loss; DeepSpeed divides by gradient_accumulation_steps."""
        self.ds.backward(loss * self._loss_factor if self._loss_factor != 1.0 else loss)

    def step(self) -> bool:
        """Count a micro step; at an accumulation boundary also update weights and lr. Returns True when
        the weights were updated."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.spec.zero_stage == 0:
            # DeepSpeed records no norm for a torch optimizer at stage 0: one pass here clips and gives it.
            params = [p for p in self.module.parameters() if p.grad is not None]
            clip = self.spec.gradient_clipping or float("inf")
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else None
        self.ds.step()
        return boundary

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else 0.0

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping."""
        if self.spec.zero_stage == 0:
            return self._grad_norm
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def global_steps(self) -> int:
        return int(self.ds.global_steps)

    # --- gathering, export, checkpoints ---------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """Gather all ZeRO-3 shards once (read-only) and yield the full module; a no-op below stage 3.

        Used for generation and export: one all-gather per call, not one per forward. Under sequence
        parallelism the module runs plain full-sequence attention inside the block.
        """
        params = list(self.module.parameters()) if self.spec.zero_stage == 3 else []
        with (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)),
            full_sequence_attention(self.module),
        ):
            yield self.module

    def save_hf(self, out_dir: str | Path, tokenizer=None, adapter: bool = False) -> Path:
        """Plain HF model dir (LoRA merged), or with `adapter` a peft adapter dir; all ranks must call it."""
        mode = "adapter" if adapter else "merged"
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
