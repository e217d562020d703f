"""Step 3: RLHF with PPO. `PPOTrainer(RLHFEngine(cfg), cfg)` gives the two halves of an iteration:

    experience = trainer.generate_experience(prompt_batch)   # rollout in inference mode, then score
    stats = trainer.train_rlhf(experience)                   # PPO epochs over mini-batches

and `fit()` runs the standard loop (`chatforge ppo`). The math lives in `chatforge.algorithms`;
B = batch, P = prompt length, A = response length.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from chatforge.algorithms import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    compute_gae,
    compute_token_rewards,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    sft_loss,
    value_loss,
)
from chatforge.config import PPOConfig
from chatforge.engine.hybrid import inference_mode
from chatforge.generation import StopStrings, generate
from chatforge.models.ema import EMA
from chatforge.models.value import sequence_scores

from .ppo_utils import PTXStream, response_logits, response_values, shape_scores
from .rlhf_engine import RLHFEngine

TaskCheck = Callable[[str, str], bool]


class PPOTrainer:
    def __init__(self, engine: RLHFEngine, config: PPOConfig, task_check: TaskCheck | None = None):
        self.engine, self.cfg, self.task_check = engine, config, task_check
        self.tokenizer = engine.tokenizer
        ppo = config.ppo
        if ppo.kl_target is None:
            self.kl_ctl = FixedKLController(ppo.kl_coef)
        else:
            self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        self.reward_stats = engine.reward_stats() if ppo.normalize_reward else None
        gen = config.generation
        self.stop_checker = StopStrings(self.tokenizer, gen.stop_strings) if gen.stop_strings else None
        rank = engine.dist.rank
        # Each rank samples its own responses; mini-batch order is shared so ranks stay in step.
        self.sampler = torch.Generator().manual_seed(config.train.seed * 7919 + rank)
        self.shuffler = torch.Generator().manual_seed(config.train.seed)
        self.ptx = self._ptx_stream() if config.ptx.enabled else None
        self.ema = EMA(config.ema.decay, config.ema.on_cpu) if config.ema.enabled else None
        self.timings = {"time_generation": 0.0, "time_scoring": 0.0, "time_training": 0.0}

    def _ptx_stream(self) -> PTXStream:
        from chatforge.data import SFTCollator, load_step_data

        data = load_step_data(self.cfg.ptx.data, self.tokenizer, "ptx")
        d = self.engine.dist
        return PTXStream(
            data.train, SFTCollator(self.tokenizer), self.cfg.ptx.micro_batch_size, d.rank, d.world_size,
            self.cfg.train.seed,
        )  # fmt: skip

    def fit(self) -> dict[str, float]:
        """The standard loop (`chatforge ppo`): see `ppo_loop.run_ppo`."""
        from .ppo_loop import run_ppo

        return run_ppo(self)

    # --- rollout -------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_batch: dict, generation=None, generator=None):
        """Sample responses in the actor's inference mode. Returns a `GenerationOutput`."""
        dev = self.engine.actor.device
        with inference_mode(self.engine.actor) as model:
            return generate(
                model,
                prompt_batch["input_ids"].to(dev),
                prompt_batch["attention_mask"].to(dev),
                generation or self.cfg.generation,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_checker=self.stop_checker,
                generator=generator or self.sampler,
            )

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict) -> Experience:
        """Roll out `prompt_batch` ({input_ids, attention_mask}: (B, P) left padded) and score it.

        old log-probs come from the actor's training-mode forward, not from the sampler, so the first
        PPO ratio is exactly 1; the sampler's log-probs are kept to log the mismatch."""
        start = time.perf_counter()
        out = self.rollout(prompt_batch)
        self.timings["time_generation"] += time.perf_counter() - start
        start = time.perf_counter()
        prompt_len = prompt_batch["input_ids"].shape[1]
        mask = out.response_mask
        attention = torch.cat([prompt_batch["attention_mask"].to(mask.device), mask], dim=1)
        seqs = out.sequences
        e = self.engine
        actor_logits = response_logits(e.actor, seqs, attention, prompt_len)
        logprobs = self._logprobs(actor_logits, seqs[:, prompt_len:])
        del actor_logits
        ref_logits = e.reference_logits(seqs, attention)[:, prompt_len - 1 : -1]
        ref_logprobs = self._logprobs(ref_logits, seqs[:, prompt_len:])
        del ref_logits
        values = response_values(e.critic, seqs, attention, prompt_len)
        raw = sequence_scores(e.reward.module, seqs, attention, forward=e.reward).float()
        exp = self._make_experience(out, attention, prompt_len, logprobs, ref_logprobs, values, raw)
        self.timings["time_scoring"] += time.perf_counter() - start
        return exp

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, A) log pi(a_t) at the sampling temperature (what the sampler's log-probs used)."""
        temperature = self.cfg.generation.temperature if self.cfg.generation.do_sample else 1.0
        return logprobs_from_logits(logits.float() / temperature, tokens)

    def _make_experience(self, out, attention, prompt_len, logprobs, ref_logprobs, values, raw) -> Experience:
        ppo, mask = self.cfg.ppo, out.response_mask
        scores = shape_scores(raw, out.finished, ppo, self.reward_stats)
        rewards, kl = compute_token_rewards(
            scores, logprobs, ref_logprobs, mask, self.kl_ctl.value,
            reward_clip=ppo.reward_clip or None, kl_kind=ppo.kl_estimator,
        )  # fmt: skip
        advantages, returns = compute_gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        self._rollout_stats = {
            "reward_raw": raw.mean().item(),
            "reward_norm": scores.mean().item(),
            "kl": masked_sum(kl, mask, dim=1).mean().item(),
            "response_length": mask.float().sum(1).mean().item(),
            "logprob_mismatch": masked_mean((logprobs - out.logprobs).abs(), mask).item(),
            "no_eos_frac": (~out.finished).float().mean().item(),
        }
        return Experience(
            sequences=out.sequences, attention_mask=attention, response_mask=mask, prompt_len=prompt_len,
            logprobs=logprobs, gen_logprobs=out.logprobs, ref_logprobs=ref_logprobs, values=values,
            scores=scores, rewards=rewards, advantages=advantages, returns=returns,
        )  # fmt: skip

    # --- PPO update ----------------------------------------------------------------------
    def train_rlhf(self, experience: Experience) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches: one actor and one critic optimizer step per mini-batch.

        Returns this rank's means over the update, plus `ratio_first` / `clip_frac_first` of the first
        mini-batch of the first epoch (1 and 0 by construction) and the rollout statistics."""
        start = time.perf_counter()
        ppo = self.cfg.ppo
        sums: dict[str, float] = {}
        n = 0
        for epoch in range(ppo.ppo_epochs):
            for batch in experience.minibatches(ppo.num_minibatches, generator=self.shuffler):
                stats = {**self._actor_step(batch), **self._critic_step(batch)}
                if epoch == 0 and n == 0:
                    stats_first = {"ratio_first": stats["ratio_mean"], "clip_frac_first": stats["clip_frac"]}
                sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
                n += 1
        self.kl_ctl.update(self._rollout_stats["kl"], experience.size * self.engine.dist.world_size)
        self.timings["time_training"] += time.perf_counter() - start
        means = {k: v / n for k, v in sums.items()}
        return {**self._rollout_stats, **means, **stats_first, "kl_coef": self.kl_ctl.value}

    def _actor_step(self, batch: Experience) -> dict[str, float]:
        actor, mask = self.engine.actor, batch.response_mask
        logits = response_logits(actor, batch.sequences, batch.attention_mask, batch.prompt_len)
        logp = self._logprobs(logits, batch.sequences[:, batch.prompt_len :])
        loss, stats = policy_loss(logp, batch.logprobs, batch.advantages, mask, self.cfg.ppo.clip_range)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        del logits
        ptx_loss = self._ptx_loss() if self.ptx is not None else None
        total = loss if ptx_loss is None else loss + self.cfg.ptx.coef * ptx_loss
        actor.backward(total)
        actor.step()
        if self.ema is not None:
            self.ema.update(actor.gathered)
        return {
            "policy_loss": loss.item(),
            "ptx_loss": 0.0 if ptx_loss is None else ptx_loss.item(),
            "entropy": entropy.item(),
            "clip_frac": stats["clip_frac"].item(),
            "approx_kl": stats["approx_kl"].item(),
            "ratio_mean": stats["ratio_mean"].item(),
        }

    def _ptx_loss(self) -> torch.Tensor:
        """Token-mean LM loss of the next PTX micro-batch (InstructGPT's PPO-ptx)."""
        from chatforge.data import model_inputs

        batch = {k: v.to(self.engine.actor.device) for k, v in self.ptx.next().items()}
        loss_sum, n_tokens = sft_loss(self.engine.actor(**model_inputs(batch)).logits, batch["labels"])
        return loss_sum / n_tokens.clamp(min=1)

    def _critic_step(self, batch: Experience) -> dict[str, float]:
        critic, ppo = self.engine.critic, self.cfg.ppo
        values = response_values(critic, batch.sequences, batch.attention_mask, batch.prompt_len)
        loss, stats = value_loss(values, batch.values, batch.returns, batch.response_mask, ppo.value_clip)
        critic.backward(ppo.value_loss_coef * loss)
        critic.step()
        return {"value_loss": loss.item(), "vf_clip_frac": stats["vf_clip_frac"].item()}


def build_trainer(config: PPOConfig) -> PPOTrainer:
    """`chatforge ppo`: the four engines from the config, then the trainer."""
    return PPOTrainer(RLHFEngine(config), config, task_check=resolve_task_check(config.train.task_check))


def resolve_task_check(path: str | None) -> TaskCheck | None:
    """Import 'module:function' (train.task_check), with an error that names the setting."""
    if not path:
        return None
    import importlib

    from chatforge.config import ConfigError

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"train.task_check={path!r} cannot be imported ({exc}); use 'package.module:function'"
        ) from None
