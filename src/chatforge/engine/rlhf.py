"""`RLHFEngine`: the models of step 3, each behind its own `TrainEngine`.

actor (trained, from the step-1 model), critic (trained, from the step-2 reward model; PPO only), reference
(frozen step-1 model) and reward models (frozen step-2 models; none with rule rewards only). With a LoRA actor
the reference is the actor itself with its adapters disabled: the frozen base IS the step-1 model, so no
second copy is held in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatforge.config import PPOConfig
from chatforge.models.loading import LoadOptions, load_causal_lm, load_scorer, load_tokenizer
from chatforge.rewards import RewardModel, split_weight

from .distributed import DistInfo, init_distributed
from .spec import ModelSpec
from .train_engine import TrainEngine


class RLHFEngine:
    def __init__(self, config: PPOConfig, dist: DistInfo | None = None):
        config.validate()
        self.cfg = config
        self.dist = dist or init_distributed()
        # Fresh heads (the critic's) start from the run's seed, whatever the process did before.
        torch.manual_seed(config.train.seed)
        eng, algo, rollout = config.engine, config.algorithm, config.rollout
        self.opts = LoadOptions(eng.trust_remote_code, eng.attn_implementation)
        self.tokenizer = load_tokenizer(config.actor.name_or_path, eng.trust_remote_code)
        # One optimizer step per mini-batch; the micro batch is one mini-batch of this rank.
        episodes = rollout.batch_size * rollout.n_samples_per_prompt
        micro = -(-episodes // algo.num_minibatches)
        steps = config.train.max_steps * algo.epochs * algo.num_minibatches
        shape = {"micro_batch_size": micro, "total_steps": steps, "dist": self.dist}
        self.actor = self._causal_lm(ModelSpec.trained(config.actor, eng, config.optim), **shape)
        self.critic = None
        if algo.has_critic:
            spec = ModelSpec.trained(config.critic, eng, config.optim)
            self.critic = self._scorer(spec, heads=1, trainable_heads=("score",), **shape)
        self.ref = None
        if not config.actor.lora_r:
            self.ref = self._causal_lm(
                ModelSpec.frozen(config.ref.name_or_path, config.actor.zero_stage, eng)
            )
        stage = (config.critic if algo.has_critic else config.actor).zero_stage
        self.reward_models = [self._reward_model(spec, stage) for spec in config.reward.models]
        gold_dirs = [g for g in config.eval.gold if ":" not in split_weight(g)[0]]
        self.gold_models = [self._reward_model(path, stage) for path in gold_dirs]

    def _causal_lm(self, spec: ModelSpec, **shape) -> TrainEngine:
        pad = self.tokenizer.pad_token_id
        return TrainEngine(
            lambda dtype: load_causal_lm(spec.name_or_path, self.opts, dtype, pad), spec, **shape
        )

    def _scorer(self, spec: ModelSpec, heads: int | None, **shape) -> TrainEngine:
        pad = self.tokenizer.pad_token_id
        return TrainEngine(
            lambda dtype: load_scorer(spec.name_or_path, self.opts, dtype, pad, heads=heads), spec, **shape
        )

    def _reward_model(self, spec: str, stage: int) -> RewardModel:
        path, weight = split_weight(spec)
        tokenizer = load_tokenizer(path, self.opts.trust_remote_code)
        engine = TrainEngine(
            lambda dtype: load_scorer(path, self.opts, dtype, tokenizer.pad_token_id),
            ModelSpec.frozen(path, stage, self.cfg.engine), dist=self.dist,
        )  # fmt: skip
        return RewardModel(engine, tokenizer, self.tokenizer, weight, name=path)

    @property
    def shares_reference(self) -> bool:
        """True when the reference is the LoRA actor with adapters disabled (no separate model)."""
        return self.ref is None

    def reference_logprobs(
        self, sequences: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float
    ) -> Tensor:
        """(B, A) log pi_ref of the response tokens."""
        if self.ref is not None:
            return self.ref.logprobs(sequences, attention_mask, prompt_len, temperature)[0]
        return self.actor.logprobs(sequences, attention_mask, prompt_len, temperature, base=True)[0]

    def engines(self) -> list[TrainEngine]:
        """Every engine (for collective checks)."""
        found = [self.actor, self.critic, self.ref] + [
            m.engine for m in self.reward_models + self.gold_models
        ]
        return [e for e in found if e is not None]
