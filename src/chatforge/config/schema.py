"""The typed configs of every chatforge command. Each field's docstring is its help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loader import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub name or local dir of a Hugging Face model (config + weights)."""
    tokenizer: str | None = None
    """Tokenizer hub name or dir; defaults to name_or_path."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repo."""
    attn_implementation: str | None = None
    """Attention kernel for transformers ('sdpa', 'eager', 'flash_attention_2'); None lets transformers pick."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (stable losses; standard for RLHF)."""


@dataclass
class LoRAConfig:
    r: int = 0
    """LoRA rank; 0 disables LoRA and trains all weights."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; 'all-linear' adapts every linear layer but the output head."""
    save: Literal["merged", "adapter"] = "merged"
    """Final model format: 'merged' writes a plain HF model, 'adapter' a peft adapter dir."""

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (DeepSpeedCPUAdam); needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep parameters on CPU between uses; needs zero_stage 3."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training dtype; 'auto' = bf16 on GPUs that support it, else fp32 (bf16 is ~12x slower on CPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    sequence_parallel_size: int = 1
    """Ulysses sequence parallelism: ranks that split each sequence (1 = off)."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON config; its keys override the ones chatforge derives."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (peft)."""

    def validate(self, name: str = "engine") -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{name}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{name}.offload_optimizer needs {name}.zero_stage >= 1 (set zero_stage=2)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{name}.offload_params needs {name}.zero_stage=3")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"{name}.sequence_parallel_size must be >= 1")


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    warmup_steps: int | None = None
    """Warmup steps; overrides warmup_ratio when set."""
    min_lr_ratio: float = 0.0
    """Floor of the decayed learning rate, as a fraction of the peak."""

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return max(0, self.warmup_steps)
        return int(round(self.warmup_ratio * total_steps))


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)
    """Dataset specs 'name_or_path[:weight][:sft|:prompts][:split=NAME][:format=NAME]' (hub name, .json/.jsonl/.parquet/.csv file, or Arrow dir); see docs/data.md."""
    data_split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    """Relative share of each dataset for steps 1 (SFT), 2 (reward), 3 (PPO prompts)."""
    eval_fraction: float = 0.05
    """Share of each step's part held out for evaluation."""
    format: str = "auto"
    """Row format: 'auto' (detected from the columns) or a named adapter: dschat, hh, conversational, standard, text."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename source columns before format detection, e.g. {question: prompt, answer: completion}."""
    split: str = "train"
    """Split read from hub datasets and saved DatasetDicts (a spec's ':split=NAME' overrides it)."""
    max_prompt_length: int = 256
    """Prompt tokens kept (truncated from the left)."""
    max_length: int = 512
    """Prompt + response tokens kept (the response is truncated from the right)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """SFT loss on assistant tokens only, or on every token."""
    packing: bool = False
    """Pack several SFT/PTX rows into one sequence (no attention across rows)."""
    cache_dir: str | None = None
    """Where tokenised data is cached (default: ~/.cache/chatforge/data)."""
    seed: int = 1234
    """Seed of the deterministic split and shuffle."""

    def validate(self, name: str = "data") -> None:
        if len(self.data_split) != 3 or min(self.data_split) < 0 or sum(self.data_split) <= 0:
            raise ConfigError(
                f"{name}.data_split must be 3 non-negative numbers with a positive sum, e.g. 2,4,4"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{name}.eval_fraction must be in [0, 1)")
        if self.max_length < 2 or not 1 <= self.max_prompt_length <= self.max_length:
            raise ConfigError(f"{name}: need 1 <= max_prompt_length <= max_length and max_length >= 2")


@dataclass
class LoopConfig:
    output_dir: str = "runs/out"
    """Where checkpoints, metrics and the final HF model go."""
    final_model_dir: str | None = None
    """Where the final plain HF model is written (default: <output_dir>/model)."""
    seed: int = 1234
    """Seed of model init (heads), dropout and data order."""
    epochs: int = 1
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    micro_batch_size: int = 8
    """Sequences per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    max_bad_steps: int = 3
    """Skip up to this many NaN/inf losses in a row before aborting."""
    tensorboard: bool = True
    """Also write tensorboard event files."""
    keep_checkpoints: int = 1
    """How many resumable checkpoints to keep."""

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train.micro_batch_size and train.gradient_accumulation_steps must be >= 1")


@dataclass
class SFTConfig:
    """Step 1: supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (the step-1 part of each dataset)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Distributed engine settings."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-4))
    """Optimizer and schedule."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Loop, logging and checkpointing."""

    def validate(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path is required (a hub name or a local model dir)")
        self.engine.validate()
        self.train.validate()


@dataclass
class RewardConfig:
    """Step 2: pairwise reward model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone (a causal LM or a sequence-classification model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs (the step-2 part of each dataset)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Distributed engine settings."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=5e-5))
    """Optimizer and schedule."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Loop, logging and checkpointing."""

    def validate(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path is required (a hub name or a local model dir)")
        self.engine.validate()
        self.train.validate()


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    """Tokens generated at most per response."""
    do_sample: bool = True
    """Sample (default); False decodes greedily."""
    temperature: float = 1.0
    """Softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop a row once its text ends with one of these (besides EOS)."""
    repetition_penalty: float = 1.0
    """Divide logits of tokens already present (>1 discourages repeats; 1.0 = off)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens must be >= 1")
        if self.temperature <= 0 and self.do_sample:
            raise ConfigError("generation.temperature must be > 0 when sampling (or set do_sample=false)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p must be in (0, 1]")
