"""The typed configs of every chatforge command. Each field's docstring is its help text, and every field is
read somewhere (tests/config/test_schema_coverage.py walks the schema).

Every command has the same shape: its models (a trained model carries its own learning rate, ZeRO stage and
LoRA rank; a frozen one only its path), `engine` (how all models of the command run), `optim` (what trained
models share besides the learning rate), `data`, and `train` (the run: output, seed, length, checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .loader import ConfigError

ZERO_STAGES = (0, 1, 2, 3)


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be > 0 and finite, got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def check_dataset_specs(setting: str, specs: list[str]) -> None:
    """Each 'name_or_path[:weight][:option]' spec parses (a weight of 0 fails here, not in a step)."""
    if not specs:
        return
    from chatforge.data.errors import DataError
    from chatforge.data.spec import parse_spec

    for spec in specs:
        try:
            parse_spec(spec)
        except DataError as exc:
            raise ConfigError(str(exc).replace("data.datasets", setting, 1)) from None


# --- models ---------------------------------------------------------------------------------------
@dataclass
class FrozenModel:
    name_or_path: str = ""
    """Hub name or local HF dir of the model (config + weights + tokenizer)."""


@dataclass
class TrainedModel:
    name_or_path: str = ""
    """Hub name or local HF dir of the model to train (config + weights + tokenizer)."""
    learning_rate: float = 1e-5
    """Peak learning rate of its AdamW."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (data parallel), 1 (+optimizer states sharded), 2 (+gradients), 3 (+weights)."""
    lora_r: int = 0
    """LoRA rank (peft, alpha = 2 * rank, every linear layer but the output head); 0 trains all weights."""

    def validate(self, name: str, engine: EngineConfig) -> None:
        _positive(f"{name}.learning_rate", self.learning_rate)
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"{name}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _at_least(f"{name}.lora_r", self.lora_r, 0)
        if engine.offload and self.zero_stage == 0:
            raise ConfigError(
                f"engine.offload needs ZeRO >= 1; set {name}.zero_stage=2 (or 3) or offload=false"
            )


@dataclass
class SupervisedModel(TrainedModel):
    """The one trained model of steps 1 and 2."""

    dropout: bool = False
    """Keep the checkpoint's dropout in training forwards (off by default: stabler small-data fine-tuning)."""


# --- how models run -----------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    """How every model of the command runs."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 on GPUs and on CPUs with native bf16 matmuls (AMX / AVX512-BF16), else fp32."""
    offload: bool = False
    """Keep optimizer states (ZeRO >= 1) and, at ZeRO-3, weights in CPU memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    sequence_parallel_size: int = 1
    """Ulysses sequence parallelism: ranks that split each sequence (1 = off; Llama and Qwen2 families)."""
    attn_implementation: str | None = None
    """Attention kernel for transformers ('sdpa', 'eager', 'flash_attention_2'); None lets transformers pick."""
    trust_remote_code: bool = False
    """Allow custom modelling code from model repos."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON config; its keys override the ones chatforge derives."""

    def validate(self) -> None:
        _at_least("engine.sequence_parallel_size", self.sequence_parallel_size, 1)


@dataclass
class OptimConfig:
    """What the trained models of a command share besides their own learning rate (AdamW, betas 0.9/0.95)."""

    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay of the learning rate after warmup."""
    warmup: float = 0.0
    """Linear warmup from 0: a fraction of the optimizer steps when < 1, else a number of steps."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""

    def validate(self) -> None:
        if self.weight_decay < 0 or self.warmup < 0 or self.gradient_clipping < 0:
            raise ConfigError("optim.weight_decay, optim.warmup and optim.gradient_clipping must be >= 0")

    def warmup_steps(self, total_steps: int) -> int:
        return int(round(self.warmup * total_steps)) if self.warmup < 1 else int(self.warmup)


# --- data ----------------------------------------------------------------------------------------------
@dataclass
class PromptDataConfig:
    """Datasets and how they are split over the three steps (the split is the same in every run)."""

    datasets: list[str] = field(default_factory=list)
    """Dataset specs 'name_or_path[:weight][:sft|:prompts][:split=NAME][:format=NAME]' (hub name, .json/.jsonl/.parquet/.csv file, or Arrow dir); see docs/data.md."""
    data_split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    """Relative share of each dataset for steps 1 (SFT), 2 (reward / DPO pairs), 3 (RL prompts)."""
    eval_fraction: float = 0.05
    """Share of each step's part held out for evaluation."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename source columns before format detection, e.g. {question: prompt, answer: completion}."""
    max_prompt_length: int = 256
    """Prompt tokens kept (truncated from the left)."""

    def validate(self, name: str = "data") -> None:
        if len(self.data_split) != 3 or min(self.data_split) < 0 or sum(self.data_split) <= 0:
            raise ConfigError(
                f"{name}.data_split must be 3 non-negative numbers with a positive sum, e.g. 2,4,4"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{name}.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _at_least(f"{name}.max_prompt_length", self.max_prompt_length, 1)
        check_dataset_specs(f"{name}.datasets", self.datasets)


@dataclass
class DataConfig(PromptDataConfig):
    """Prompt + response data (reward pairs, DPO pairs)."""

    max_length: int = 512
    """Prompt + response tokens kept (the response is truncated from the right)."""

    def validate(self, name: str = "data") -> None:
        super().validate(name)
        if self.max_length < 2 or self.max_prompt_length > self.max_length:
            raise ConfigError(f"{name}: need max_prompt_length <= max_length and max_length >= 2")


@dataclass
class SFTDataConfig(DataConfig):
    loss_on: Literal["assistant", "all"] = "assistant"
    """SFT loss on assistant tokens only, or on every token."""
    packing: bool = False
    """Pack several rows into one sequence (no attention across rows)."""


# --- generation requests (not a command setting: what `chatforge.generation.generate` is asked) ----------
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


# --- the run ----------------------------------------------------------------------------------------------
REPORT_TARGETS = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class RunConfig:
    """Where a run writes, how long it runs, and its checkpoints."""

    output_dir: str = "runs/out"
    """Run dir: checkpoints, metrics.jsonl, config.yaml, DONE (default per command: runs/sft, runs/reward, runs/dpo, runs/ppo)."""
    final_model_dir: str | None = None
    """Where the trained model is written as a plain HF dir (default: <output_dir>/model)."""
    seed: int = 1234
    """Seed of head init, sampling, data order and mini-batch shuffles."""
    max_steps: int | None = None
    """Optimizer steps (RL: iterations) to run; None = all epochs (RL: required)."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the start and the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers besides metrics.jsonl: any of tensorboard, wandb, mlflow; or none."""

    def validate(self) -> None:
        if self.max_steps is not None:
            _at_least("train.max_steps", self.max_steps, 1)
        for name in ("eval_every", "save_every"):
            _at_least(f"train.{name}", getattr(self, name), 0)
        bad = [t for t in self.report_to if t not in REPORT_TARGETS]
        if bad:
            raise ConfigError(
                f"train.report_to: unknown tracker(s) {bad}; choose from {list(REPORT_TARGETS)}"
            )


@dataclass
class BatchConfig:
    micro_batch_size: int = 8
    """Rows (reward/DPO: pairs) per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    epochs: int = 1
    """Passes over the training split (train.max_steps stops earlier when smaller)."""

    def validate(self) -> None:
        _at_least("batch.micro_batch_size", self.micro_batch_size, 1)
        _at_least("batch.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _at_least("batch.epochs", self.epochs, 1)


def run_in(output_dir: str):
    """A command's default `train` section: each command writes to its own dir (runs/sft, runs/reward, ...),
    so running them one after another with the defaults keeps every model."""
    return lambda: RunConfig(output_dir=output_dir)


def _validate_trained(cfg, models: dict[str, TrainedModel]) -> None:
    cfg.engine.validate()
    cfg.optim.validate()
    for name, model in models.items():
        if not model.name_or_path:
            raise ConfigError(f"{name}.name_or_path is required (a hub name or a local model dir)")
        model.validate(name, cfg.engine)
    cfg.train.validate()


# --- steps 1 and 2, and DPO --------------------------------------------------------------------------------
@dataclass
class SFTConfig:
    """Step 1: supervised fine-tuning."""

    model: SupervisedModel = field(default_factory=lambda: SupervisedModel(learning_rate=1e-4))
    """The model to fine-tune."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """How the model runs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Conversations (the step-1 part of each dataset)."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch sizes and epochs."""
    train: RunConfig = field(default_factory=run_in("runs/sft"))
    """The run."""

    def validate(self) -> None:
        _validate_trained(self, {"model": self.model})
        self.data.validate()
        self.batch.validate()


@dataclass
class RewardModelConfig(SupervisedModel):
    heads: int = 1
    """Score heads trained side by side (an ensemble for a conservative reward in step 3; Coste et al. 2023)."""


@dataclass
class RewardConfig:
    """Step 2: pairwise reward model."""

    model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(learning_rate=5e-5))
    """Backbone (a causal LM or a sequence-classification model)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """How the model runs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs (the step-2 part of each dataset)."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch sizes and epochs."""
    train: RunConfig = field(default_factory=run_in("runs/reward"))
    """The run."""

    def validate(self) -> None:
        _validate_trained(self, {"model": self.model})
        _at_least("model.heads", self.model.heads, 1)
        self.data.validate()
        self.batch.validate()


@dataclass
class DPOLossConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / pi_ref) (Rafailov et al. 2023)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid' = DPO; 'ipo' = IPO's squared loss (Azar et al. 2023)."""
    label_smoothing: float = 0.0
    """cDPO: assumed share of flipped preference labels (sigmoid loss only)."""
    sft_coef: float = 0.0
    """RPO (Pang et al. 2024): add this times the chosen replies' token-mean NLL, so DPO cannot lower the chosen replies' likelihood along with the rejected ones'."""

    def validate(self) -> None:
        _positive("dpo.beta", self.beta)
        if self.sft_coef < 0:
            raise ConfigError(f"dpo.sft_coef must be >= 0, got {self.sft_coef}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("dpo.label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss == "ipo":
            raise ConfigError("dpo.label_smoothing applies to the sigmoid loss only; set it to 0 for ipo")


@dataclass
class DPOConfig:
    """Direct preference optimisation: the offline alternative to steps 2 + 3."""

    policy: TrainedModel = field(default_factory=lambda: TrainedModel(learning_rate=5e-6))
    """The model to train (usually the step-1 model)."""
    ref: FrozenModel = field(default_factory=FrozenModel)
    """The frozen reference (default: policy.name_or_path; with policy.lora_r > 0, the policy's own base)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """How the models run (the reference follows policy.zero_stage)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    """The loss."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs (the step-2 part of each dataset)."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch sizes and epochs."""
    train: RunConfig = field(default_factory=run_in("runs/dpo"))
    """The run."""

    def validate(self) -> None:
        _validate_trained(self, {"policy": self.policy})
        self.ref.name_or_path = self.ref.name_or_path or self.policy.name_or_path
        self.dpo.validate()
        self.data.validate()
        self.batch.validate()
