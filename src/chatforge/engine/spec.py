"""`ModelSpec`: everything the engine needs to build and run one model, resolved from a command's config.

A command's config says per model only what differs (path, learning rate, ZeRO stage, LoRA rank) and shares
the rest (`engine`, `optim`); the spec is the flat, resolved view the engine works from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str
    zero_stage: int = 0
    precision: str = "auto"
    offload: bool = False
    gradient_checkpointing: bool = False
    sequence_parallel_size: int = 1
    deepspeed_config: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora_r: int = 0
    dropout: bool = False
    """Keep the checkpoint's dropout in training forwards (SFT/RM option); RL and DPO never do."""
    # --- training only; learning_rate None = a frozen model
    learning_rate: float | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup: float = 0.0
    gradient_clipping: float = 1.0

    @property
    def trainable(self) -> bool:
        return self.learning_rate is not None

    @property
    def lora_alpha(self) -> float:
        """alpha = 2 r: the LoRA update's scale alpha / r is 2 whatever the rank."""
        return 2.0 * self.lora_r

    @classmethod
    def trained(cls, model, engine, optim, dropout: bool = False) -> ModelSpec:
        """From a TrainedModel section plus the command's EngineConfig and OptimConfig."""
        return cls(
            model.name_or_path, model.zero_stage, engine.precision, engine.offload,
            engine.gradient_checkpointing, engine.sequence_parallel_size, engine.deepspeed_config,
            engine.trust_remote_code, engine.attn_implementation, model.lora_r, dropout,
            model.learning_rate, optim.weight_decay, optim.lr_scheduler, optim.warmup, optim.gradient_clipping,
        )  # fmt: skip

    @classmethod
    def frozen(cls, name_or_path: str, zero_stage: int, engine) -> ModelSpec:
        """A frozen model that follows a trained one's ZeRO stage: sharded at stage 3 (weights offloaded with
        it); below, stages 1-2 shard only optimizer state and gradients, which it has none of, so stage 0."""
        zero_stage = 3 if zero_stage == 3 else 0
        return cls(
            name_or_path, zero_stage, engine.precision, engine.offload and zero_stage == 3, False,
            engine.sequence_parallel_size, engine.deepspeed_config, engine.trust_remote_code,
            engine.attn_implementation,
        )  # fmt: skip

    def with_path(self, name_or_path: str) -> ModelSpec:
        return replace(self, name_or_path=name_or_path)

    def warmup_steps(self, total_steps: int) -> int:
        return int(round(self.warmup * total_steps)) if self.warmup < 1 else int(self.warmup)
