"""`RLHFEngine`: the four models of step 3, each behind its own `TrainEngine` (ZeRO stage, offload, LoRA).

actor (trained, from the step-1 model), critic (trained, from the step-2 reward model), reference (frozen
step-1 model) and reward (frozen step-2 model). With a LoRA actor the reference is the actor itself with
its adapters disabled: the frozen base IS the step-1 model, so no second copy is held in memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from chatforge.config import PPOConfig
from chatforge.engine import DistInfo, TrainEngine, init_distributed
from chatforge.models.loading import load_causal_lm, load_scorer, load_tokenizer
from chatforge.models.value import position_ids_from_mask

REWARD_STATS_FILE = "reward_stats.json"


class RLHFEngine:
    def __init__(self, config: PPOConfig, dist: DistInfo | None = None):
        config.validate()
        self.cfg = config
        self.dist = dist or init_distributed()
        actor_cfg = config.actor
        self.tokenizer = load_tokenizer(
            actor_cfg.tokenizer or actor_cfg.name_or_path, actor_cfg.trust_remote_code
        )
        pad = self.tokenizer.pad_token_id
        t, ppo = config.train, config.ppo
        # One optimizer step per mini-batch; the micro batch is one mini-batch of this rank.
        micro = -(-t.rollout_batch_size // ppo.num_minibatches)
        steps = t.max_steps * ppo.ppo_epochs * ppo.num_minibatches
        self.actor = TrainEngine(
            lambda dtype: load_causal_lm(config.actor, dtype, pad), config.actor_engine, config.actor_optim,
            micro_batch_size=micro, total_steps=steps, dist=self.dist,
        )  # fmt: skip
        self.critic = TrainEngine(
            lambda dtype: load_scorer(config.critic, dtype, pad), config.critic_engine, config.critic_optim,
            micro_batch_size=micro, total_steps=steps, trainable_heads=("score",), dist=self.dist,
        )  # fmt: skip
        self.ref = None
        if not config.actor_engine.lora.enabled:
            self.ref = TrainEngine(
                lambda dtype: load_causal_lm(config.ref, dtype, pad), config.ref_engine, None,
                micro_batch_size=t.rollout_batch_size, dist=self.dist,
            )  # fmt: skip
        self.reward = TrainEngine(
            lambda dtype: load_scorer(config.reward, dtype, pad), config.reward_engine, None,
            micro_batch_size=t.rollout_batch_size, dist=self.dist,
        )  # fmt: skip

    @property
    def shares_reference(self) -> bool:
        """True when the reference is the LoRA actor with adapters disabled (no separate model)."""
        return self.ref is None

    @contextlib.contextmanager
    def _reference_forward(self) -> Iterator[TrainEngine]:
        if self.ref is not None:
            yield self.ref
            return
        with self.actor.module.disable_adapter():
            yield self.actor

    @torch.no_grad()
    def reference_logits(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the frozen reference policy."""
        with self._reference_forward() as engine:
            return engine(
                input_ids=sequences,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).logits

    def reward_stats(self) -> dict | None:
        """{mean, std, count} of step-2 scores, saved by the reward trainer beside the reward model."""
        path = Path(self.cfg.reward.name_or_path) / REWARD_STATS_FILE
        return json.loads(path.read_text()) if path.is_file() else None
