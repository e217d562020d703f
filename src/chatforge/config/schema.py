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
class StepConfig:
    """What steps 1 and 2 share: one model trained on one part of the data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (this step's part of each dataset)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Distributed engine settings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Loop, logging and checkpointing."""

    def validate(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path is required (a hub name or a local model dir)")
        self.data.validate()
        self.engine.validate()
        self.train.validate()


@dataclass
class SFTConfig(StepConfig):
    """Step 1: supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-4))
    """Optimizer and schedule."""


@dataclass
class RewardConfig(StepConfig):
    """Step 2: pairwise reward model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone (a causal LM or a sequence-classification model)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=5e-5))
    """Optimizer and schedule."""


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


@dataclass
class PPOAlgoConfig:
    """PPO hyper-parameters (InstructGPT; "The N implementation details of RLHF with PPO")."""

    kl_coef: float = 0.05
    """Initial coefficient beta of the per-token KL penalty against the reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator: k1 = log pi - log pi_ref (InstructGPT), k3 = low-variance, always >= 0."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): target KL per sequence; None keeps kl_coef fixed."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in episodes (how fast beta moves towards the target)."""
    gamma: float = 1.0
    """Discount of GAE (1.0: the episode is one response)."""
    lam: float = 0.95
    """Lambda of GAE."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float = 0.2
    """Clip of the value update around the rollout values."""
    reward_clip: float = 5.0
    """Clip the reward-model score (after normalisation) to [-reward_clip, reward_clip]; 0 disables."""
    normalize_reward: bool = False
    """Normalise scores with the step-2 statistics (reward_stats.json beside the reward model)."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch."""
    ppo_epochs: int = 1
    """Passes of PPO updates over each rollout batch."""
    num_minibatches: int = 1
    """Mini-batches (optimizer steps) per epoch; the rollout batch is split into this many."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that end without EOS (None: no penalty)."""
    value_loss_coef: float = 1.0
    """Scale of the critic's loss (the critic has its own optimizer; this only rescales its gradient)."""

    def validate(self) -> None:
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ConfigError("ppo.ppo_epochs and ppo.num_minibatches must be >= 1")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")
        if self.clip_range <= 0 or self.value_clip <= 0:
            raise ConfigError("ppo.clip_range and ppo.value_clip must be > 0")
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ConfigError("ppo.kl_target and ppo.kl_horizon must be > 0 for the adaptive KL")


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the actor's weights and save it as its own HF dir."""
    decay: float = 0.992
    """EMA decay per optimizer step: ema = decay * ema + (1 - decay) * weights."""
    on_cpu: bool = False
    """Hold the EMA weights in CPU memory (saves accelerator memory)."""

    def validate(self) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError("ema.decay must be in [0, 1)")


@dataclass
class PTXConfig:
    """Mixture training (InstructGPT "PPO-ptx"): a language-modelling loss on plain text added to the actor update."""

    coef: float = 0.0
    """Weight gamma of the pretraining loss in the actor loss; 0 disables PTX."""
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.0))
    """Plain-text datasets (rows with a 'text' column); every row is used."""
    micro_batch_size: int = 4
    """PTX sequences per process per actor optimizer step."""

    @property
    def enabled(self) -> bool:
        return self.coef > 0


@dataclass
class PPOLoopConfig:
    output_dir: str = "runs/ppo"
    """Where checkpoints, metrics and the final HF models go."""
    final_model_dir: str | None = None
    """Where the trained actor is written as a plain HF model (default: <output_dir>/actor)."""
    ema_model_dir: str | None = None
    """Where the EMA actor is written (default: <output_dir>/actor-ema); only with ema.enabled."""
    critic_model_dir: str | None = None
    """Also save the trained critic here (None: not saved)."""
    seed: int = 1234
    """Seed of sampling, data order and mini-batch shuffles."""
    max_steps: int = 20
    """PPO iterations (one rollout batch + its PPO epochs each)."""
    rollout_batch_size: int = 16
    """Prompts per process per iteration."""
    eval_every: int = 0
    """Evaluate on held-out prompts every N iterations (0: only at the start and the end)."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation (over all processes)."""
    save_every: int = 0
    """Write a resumable checkpoint every N iterations (0: only at the end)."""
    log_every: int = 1
    """Log metrics every N iterations."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    tensorboard: bool = True
    """Also write tensorboard event files."""
    task_check: str | None = None
    """'module:function' called as f(prompt_text, response_text) -> bool; evaluations then log task_accuracy
    (e.g. chatforge.fixtures.task:is_correct for the demo task)."""
    keep_checkpoints: int = 1
    """How many resumable checkpoints to keep."""

    def validate(self) -> None:
        if self.max_steps < 1 or self.rollout_batch_size < 1:
            raise ConfigError("train.max_steps and train.rollout_batch_size must be >= 1")


@dataclass
class PPOConfig:
    """Step 3: RLHF with PPO. Four models: actor (trained), critic (trained), reference and reward (frozen)."""

    actor: ModelConfig = field(default_factory=ModelConfig)
    """The policy, initialised from the step-1 (SFT) model."""
    critic: ModelConfig = field(default_factory=ModelConfig)
    """The value model, initialised from the step-2 reward model (default: reward.name_or_path)."""
    reward: ModelConfig = field(default_factory=ModelConfig)
    """The step-2 reward model (frozen)."""
    ref: ModelConfig = field(default_factory=ModelConfig)
    """The frozen reference policy (default: actor.name_or_path; with actor LoRA, the actor's base itself)."""
    actor_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine of the actor (ZeRO stage, offload, LoRA)."""
    critic_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine of the critic."""
    ref_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine of the reference model (frozen: no optimizer)."""
    reward_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine of the reward model (frozen: no optimizer)."""
    actor_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(learning_rate=1e-5, lr_scheduler="constant")
    )
    """Actor optimizer (its own learning rate)."""
    critic_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(learning_rate=5e-5, lr_scheduler="constant")
    )
    """Critic optimizer (its own learning rate)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    """Rollout sampling (sampled, not greedy, by default)."""
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    """PPO hyper-parameters."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Exponential moving average of the actor."""
    ptx: PTXConfig = field(default_factory=PTXConfig)
    """Mixture with a pretraining loss (PPO-ptx)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts (the step-3 part of each dataset)."""
    train: PPOLoopConfig = field(default_factory=PPOLoopConfig)
    """Loop, logging and checkpointing."""

    def validate(self) -> None:
        if not self.actor.name_or_path or not self.reward.name_or_path:
            raise ConfigError(
                "actor.name_or_path (step-1 model) and reward.name_or_path (step-2) are required"
            )
        self.critic.name_or_path = self.critic.name_or_path or self.reward.name_or_path
        self.ref.name_or_path = self.ref.name_or_path or self.actor.name_or_path
        for name in ("actor_engine", "critic_engine", "ref_engine", "reward_engine"):
            getattr(self, name).validate(name)
        self.generation.validate()
        self.ppo.validate()
        self.ema.validate()
        self.train.validate()
        if self.ppo.num_minibatches > self.train.rollout_batch_size:
            raise ConfigError("ppo.num_minibatches must be <= train.rollout_batch_size")
