"""The config of step 3: online RL (`chatforge ppo`). One trainer runs PPO and the critic-free estimators
(GRPO, Dr. GRPO, RLOO, REINFORCE++); the algorithm decides whether a critic exists. See docs/ppo.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loader import ConfigError
from .schema import (
    EngineConfig,
    FrozenModel,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    TrainedModel,
    _at_least,
    _positive,
    _validate_trained,
    check_dataset_specs,
)

Algorithm = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce++"]
GROUP_ALGORITHMS = ("grpo", "dr_grpo", "rloo")


@dataclass
class RolloutConfig:
    """What each iteration samples. Rollouts always sample from the policy itself (no top-k/top-p), so the
    log-probs PPO trains on are those of the distribution the responses came from."""

    batch_size: int = 16
    """Prompts per process per iteration."""
    n_samples_per_prompt: int = 1
    """Responses sampled per prompt (GRPO and RLOO compare them within the group: >= 2)."""
    max_new_tokens: int = 128
    """Tokens generated at most per response."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""
    stop_strings: list[str] = field(default_factory=list)
    """End a response once its text contains one of these (besides the model's end-of-turn tokens)."""
    backend: Literal["native", "vllm"] = "native"
    """Who samples: chatforge's KV-cache loop on the actor itself, or vLLM (GPU, `pip install 'chatforge[vllm]'`; weights synced every iteration)."""

    def validate(self) -> None:
        _at_least("rollout.batch_size", self.batch_size, 1)
        _at_least("rollout.n_samples_per_prompt", self.n_samples_per_prompt, 1)
        _at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        _positive("rollout.temperature", self.temperature)


@dataclass
class AlgorithmConfig:
    """The estimator, the update and the KL regularisation (defaults justified in docs/ppo.md)."""

    name: Algorithm = "ppo"
    """'ppo' (GAE with a critic), or critic-free: 'grpo', 'dr_grpo' (GRPO without the std division), 'rloo', 'reinforce++'."""
    epochs: int = 4
    """Passes of updates over each rollout batch."""
    num_minibatches: int = 2
    """Optimizer steps per pass: the rollout batch is split into this many mini-batches."""
    clip_range: float = 0.2
    """PPO clip of the probability ratio, and of the critic's value update around the rollout values."""
    lam: float = 0.95
    """GAE lambda (ppo)."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta against the reference (SFT) policy."""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL acts: a per-token reward penalty with the k1 estimator (InstructGPT), or a loss term with the low-variance k3 (GRPO); 'auto' = loss for grpo/dr_grpo, reward otherwise."""
    kl_target: float | None = 1.0
    """Adaptive KL (Ziegler et al. 2019): target KL per response in nats, beta moves towards it; None keeps beta fixed. With a reward model and no eval.gold, only evaluations whose median response the SFT model finds at most kl_target / 2 nats less likely than its own may be exported (None: the last actor is)."""
    kl_limit: float | None = 3.0
    """Hard KL budget per response in nats: when the median response's KL, averaged over the last 3 iterations, passes it, the run stops and the last checkpoint within budget is exported; None = no limit."""
    loss_agg: Literal["auto", "token_mean", "seq_mean", "seq_sum"] = "auto"
    """Policy-loss aggregation: mean over all tokens; mean over responses of their token mean (GRPO); or of their token sum / max_new_tokens (Dr. GRPO); 'auto' = seq_mean for grpo, seq_sum for dr_grpo, token_mean otherwise."""

    @property
    def has_critic(self) -> bool:
        return self.name == "ppo"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_in == "loss" or (self.kl_in == "auto" and self.name in ("grpo", "dr_grpo"))

    @property
    def kl_kind(self) -> str:
        """k1 = log pi - log pi_ref as a reward (unbiased); k3 as a loss (low variance, >= 0; Schulman 2020)."""
        return "k3" if self.kl_in_loss else "k1"

    def validate(self) -> None:
        _at_least("algorithm.epochs", self.epochs, 1)
        _at_least("algorithm.num_minibatches", self.num_minibatches, 1)
        _positive("algorithm.clip_range", self.clip_range)
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"algorithm.lam must be in [0, 1], got {self.lam}")
        if self.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("kl_target", "kl_limit"):
            value = getattr(self, name)
            if value is not None:
                _positive(f"algorithm.{name}", value)
        if self.kl_target is not None and self.kl_limit is not None and self.kl_limit <= self.kl_target:
            raise ConfigError("algorithm.kl_limit must be above algorithm.kl_target (or null)")


@dataclass
class RewardSignalConfig:
    """Where the reward comes from: step-2 reward models, rule functions, or a weighted sum of both."""

    models: list[str] = field(default_factory=list)
    """Reward-model dirs ('DIR' or 'DIR*weight'); several (or one with several heads) form an ensemble. Scores are normalised with the step-2 statistics (reward_stats.json) when present."""
    functions: list[str] = field(default_factory=list)
    """Rule rewards 'module:function' or 'module:function*weight', called f(prompts, responses, **row_fields) -> scores (row_fields include messages and finished); e.g. chatforge.rewards.rules:unfinished*-1.0 penalises replies that never end."""
    conservative: float = 0.0
    """With an ensemble: the score is mean - conservative * std over its members (Coste et al. 2023)."""
    clip: float = 5.0
    """Clip the total score to [-clip, clip]; 0 disables."""

    def validate(self) -> None:
        if not self.models and not self.functions:
            raise ConfigError(
                "step 3 needs a reward: reward.models=[DIR] (a step-2 reward model) and/or "
                "reward.functions=[module:function] (a rule reward)"
            )
        if self.conservative < 0 or self.clip < 0:
            raise ConfigError("reward.conservative and reward.clip must be >= 0")


@dataclass
class EvalConfig:
    """Held-out evaluation during step 3, and the guard against reward over-optimisation (docs/ppo.md)."""

    prompts: int = 64
    """Held-out prompts per evaluation (over all processes)."""
    samples: int = 4
    """Sampled responses per held-out prompt (besides the greedy one), for sampled accuracy and diversity."""
    gold: list[str] = field(default_factory=list)
    """Trusted signals ('module:function' checks or rewards, or a 'gold' reward-model dir), scored at every evaluation; the exported model is the latest evaluation within one standard error of the best by the first one (the last actor is kept in <output_dir>/actor-last when they differ)."""

    def validate(self) -> None:
        _at_least("eval.prompts", self.prompts, 1)
        _at_least("eval.samples", self.samples, 0)


@dataclass
class EMAConfig:
    decay: float = 0.0
    """Exponential moving average of the actor's weights per optimizer step, saved as <final_model_dir>-ema; 0 = off."""

    def validate(self) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass
class PTXConfig:
    """Mixture training (InstructGPT "PPO-ptx"): a language-modelling loss on plain text in every actor step."""

    coef: float = 0.0
    """Weight of the pretraining loss in the actor loss; 0 disables PTX."""
    datasets: list[str] = field(default_factory=list)
    """Plain-text datasets (a 'text' column); rows are cut into chunks of max_prompt_length + max_new_tokens."""

    def validate(self) -> None:
        if self.coef < 0:
            raise ConfigError("ptx.coef must be >= 0")
        if self.coef > 0 and not self.datasets:
            raise ConfigError("ptx.coef > 0 needs ptx.datasets=[FILE] (plain text with a 'text' column)")
        check_dataset_specs("ptx.datasets", self.datasets)


def _rl_run() -> RunConfig:
    return RunConfig(output_dir="runs/ppo", max_steps=20, eval_every=10)


@dataclass
class PPOConfig:
    """Step 3: online RL. The actor (trained) samples responses; the reward scores them; the reference (frozen
    SFT model) anchors the KL; with algorithm.name=ppo a critic (trained) estimates values."""

    actor: TrainedModel = field(default_factory=TrainedModel)
    """The policy, initialised from the step-1 (SFT) model."""
    critic: TrainedModel = field(default_factory=lambda: TrainedModel(learning_rate=5e-5))
    """The value model (ppo only); default: the first reward model, else the actor's model."""
    ref: FrozenModel = field(default_factory=FrozenModel)
    """The frozen reference (default: the actor's model; with actor.lora_r > 0, the actor's own base). Follows actor.zero_stage."""
    reward: RewardSignalConfig = field(default_factory=RewardSignalConfig)
    """The reward (reward models follow the critic's ZeRO stage, or the actor's without a critic)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """How the models run."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr_scheduler="constant"))
    """Optimizer and schedule of the actor and critic."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Estimator, update and KL."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation and the over-optimisation guard."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the actor."""
    ptx: PTXConfig = field(default_factory=PTXConfig)
    """Pretraining-loss mixture."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    """Prompts (the step-3 part of each dataset)."""
    train: RunConfig = field(default_factory=_rl_run)
    """The run."""

    def validate(self) -> None:
        trained = {"actor": self.actor}
        self.reward.validate()
        if self.algorithm.has_critic:
            self.critic.name_or_path = self.critic.name_or_path or (
                strip_weight(self.reward.models[0]) if self.reward.models else self.actor.name_or_path
            )
            trained["critic"] = self.critic
        self.ref.name_or_path = self.ref.name_or_path or self.actor.name_or_path
        _validate_trained(self, trained)
        if self.train.max_steps is None:
            raise ConfigError("train.max_steps (RL iterations) is required for step 3")
        for section in (self.rollout, self.algorithm, self.eval, self.ema, self.ptx, self.data):
            section.validate()
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        algo, n = self.algorithm, self.rollout.n_samples_per_prompt
        if algo.name in GROUP_ALGORITHMS and n < 2:
            raise ConfigError(
                f"algorithm.name={algo.name} compares responses to the same prompt: set "
                "rollout.n_samples_per_prompt >= 2 (e.g. 4)"
            )
        if algo.num_minibatches > self.rollout.batch_size * n:
            raise ConfigError(
                "algorithm.num_minibatches must be <= rollout.batch_size * rollout.n_samples_per_prompt"
            )
        if self.reward.conservative and len(self.reward.models) < 1:
            raise ConfigError("reward.conservative needs a reward-model ensemble in reward.models")
        sp = self.engine.sequence_parallel_size
        if sp > 1 and (self.rollout.batch_size * n) % sp:
            raise ConfigError(
                f"engine.sequence_parallel_size={sp}: rollout.batch_size x n_samples_per_prompt "
                f"({self.rollout.batch_size * n}) must be a multiple of it (each rank of a group samples a share)"
            )


def strip_weight(spec: str) -> str:
    """'DIR*0.5' -> 'DIR'."""
    head, sep, tail = spec.rpartition("*")
    try:
        float(tail)
    except ValueError:
        return spec
    return head if sep else spec
