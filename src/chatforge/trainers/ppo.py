"""Step 3: online RL, one loop for PPO and the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++).

    trainer = PPOTrainer(RLHFEngine(cfg), cfg)
    experience = trainer.generate_experience(prompt_batch)   # rollout, scoring, advantages
    stats = trainer.train_rlhf(experience)                   # epochs x mini-batches of updates
    trainer.fit()                                            # the standard loop (`chatforge ppo`)

An iteration, top to bottom: sample responses in the actor's inference mode (n per prompt); score them
(old log-probs by the training forward, reference log-probs, critic values for PPO, the reward); turn the
scores into advantages (GAE, or group/batch baselines); update the actor (and critic). The algorithm is
configuration: it picks the estimator, whether a critic exists and where the KL acts. The math lives in
`chatforge.algorithms`, forward semantics in `chatforge.engine`. B = responses, P = prompt length,
A = response length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from chatforge.algorithms import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    aggregate,
    compute_gae,
    compute_token_rewards,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    value_loss,
)
from chatforge.algorithms.diversity import distinct_n, identical_share
from chatforge.config import PPOConfig, save_yaml, to_dict
from chatforge.config.schema import GenerationConfig
from chatforge.data.render import end_of_turn_ids
from chatforge.engine import all_reduce_sum
from chatforge.engine.export import merged_tensors
from chatforge.engine.hybrid import inference_mode
from chatforge.engine.rlhf import RLHFEngine
from chatforge.engine.sequence_parallel import gather_rows
from chatforge.generation import GenerationOutput
from chatforge.generation.backends import GenerationBackend, build_backend
from chatforge.rewards import Responses, RewardSignal, load_function, split_weight

from .checkpoint import load_checkpoint, maybe_die, naming_a_full_disk, save_checkpoint, seed_everything
from .export_choice import choose, export_key, judged_kind, max_drift, may_compete, reference_drift
from .guard import NonFiniteGuard, finite_or_zero, zeroed_gradients
from .run_dir import MetricsLogger, Progress, RunDir
from .schedule import BatchSchedule, BatchStream

log = logging.getLogger("chatforge")
__all__ = ["PPOTrainer", "RLHFEngine", "build_trainer"]
SAMPLE_ROWS = 8  # held-out prompts whose responses are written to samples.jsonl at every evaluation
KL_WINDOW = 3  # iterations whose mean KL the hard limit judges


class PPOTrainer:
    def __init__(self, engine: RLHFEngine, config: PPOConfig):
        self.engine, self.cfg = engine, config
        self.tokenizer = engine.tokenizer
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        algo, r = config.algorithm, config.reward
        if algo.kl_target is None:
            self.kl_ctl = FixedKLController(algo.kl_coef)
            if r.models and not config.eval.gold:
                log.warning("algorithm.kl_target is null and eval.gold empty: nothing guards the export, the last "
                            "actor is the final model however far it drifts from the SFT model")  # fmt: skip
        else:
            self.kl_ctl = AdaptiveKLController(algo.kl_coef, algo.kl_target, horizon=10_000)
        functions = [load_function(f, "reward.functions") for f in r.functions]
        self.reward = RewardSignal(engine.reward_models, functions, r.conservative, r.clip)
        gold_fns = [load_function(g, "eval.gold") for g in config.eval.gold if ":" in split_weight(g)[0]]
        self.gold = {f"gold:{f.name}": RewardSignal([], [f]) for f in gold_fns}
        self.gold.update({f"gold:{Path(m.name).name}": RewardSignal([m], []) for m in engine.gold_models})
        self.backend = self._backend()
        self.dist = engine.dist
        self.sp = engine.actor.sp
        self.dp = self.sp.data_parallel(self.dist)
        # Each data-parallel rank samples its own responses (ranks of one SP group share theirs); the
        # generator lives on the actor's device, as the sampler draws there.
        self.sampler = torch.Generator(device=engine.actor.device).manual_seed(
            config.train.seed * 7919 + self.dist.rank
        )
        self.shuffler = torch.Generator().manual_seed(config.train.seed)
        self.ptx = self._ptx_stream() if config.ptx.coef > 0 else None
        self.ema = None
        if config.ema.decay > 0:
            from chatforge.engine.ema import EMA

            self.ema = EMA(config.ema.decay, engine.actor.module, self.dist.is_main)
        self.guards = {"actor": NonFiniteGuard("actor loss"), "critic": NonFiniteGuard("critic loss")}
        self.timings = {"time_generation": 0.0, "time_scoring": 0.0, "time_training": 0.0}
        self.step = 0

    def _backend(self) -> GenerationBackend:
        """The rollout sampler: chatforge's loop on the actor in inference mode (the default), or vLLM with
        the actor's weights synced every iteration."""
        actor, pad = self.engine.actor, self.tokenizer.pad_token_id
        if self.cfg.rollout.backend == "native":
            return build_backend(
                "native", lambda: inference_mode(actor), eos_token_id=self.stop_ids, pad_token_id=pad,
                tokenizer=self.tokenizer,
            )  # fmt: skip
        return build_backend(
            "vllm", self.cfg.actor.name_or_path, eos_token_id=self.stop_ids, pad_token_id=pad
        )

    def _sync_backend(self) -> None:
        """Hand the actor's current (LoRA-merged) weights to an external sampler; every rank takes part in
        the ZeRO-3 gathers and feeds its own sampler."""
        if self.cfg.rollout.backend != "native":
            self.backend.load_weights(
                (name, value) for name, value, _ in merged_tensors(self.engine.actor.module, True, True)
            )

    def _ptx_stream(self) -> BatchStream:
        from chatforge.data import SFTCollator, load_step_data

        c = self.cfg
        chunk = c.data.max_prompt_length + c.rollout.max_new_tokens
        data = load_step_data(c.ptx, self.tokenizer, "ptx", eval_fraction=0.0, max_length=chunk)
        micro = self.engine.actor.ds_config["train_micro_batch_size_per_gpu"]
        seed = c.train.seed
        return BatchStream(
            data.train, SFTCollator(self.tokenizer), micro, self.dp.rank, self.dp.world_size, seed, "PTX"
        )

    # --- one iteration, part 1: rollout, scoring, advantages -----------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_batch: dict, generation: GenerationConfig, generator=None) -> GenerationOutput:
        """Sample responses to left-padded prompts (B, P) in the actor's inference mode. Under Ulysses each
        rank of a sequence-parallel group samples its share of the rows and the group shares them."""
        ids, mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
        if self.sp.enabled:
            ids, mask = (
                ids.tensor_split(self.sp.size)[self.sp.sp_rank],
                mask.tensor_split(self.sp.size)[self.sp.sp_rank],
            )
        dev = self.engine.actor.device
        if ids.shape[0] == 0:  # a sequence-parallel rank with no row of a short batch still enters the
            with inference_mode(self.engine.actor):  # gather, as every rank must under ZeRO-3
                empty = torch.zeros(0, 0, dtype=torch.long, device=dev)
            out = GenerationOutput(
                ids.to(dev), empty, empty.float(), torch.zeros(0, dtype=torch.bool, device=dev)
            )
        else:
            out = self.backend.generate(ids.to(dev), mask.to(dev), generation, generator or self.sampler)
        if not self.sp.enabled:
            return out
        pad = self.tokenizer.pad_token_id
        return GenerationOutput(
            gather_rows(out.sequences, self.sp, pad), gather_rows(out.response_mask, self.sp, 0),
            gather_rows(out.logprobs, self.sp, 0.0), gather_rows(out.finished, self.sp, 0),
        )  # fmt: skip

    def _rollout_config(self) -> GenerationConfig:
        r = self.cfg.rollout
        return GenerationConfig(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, stop_strings=r.stop_strings
        )

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict) -> Experience:
        """Roll out `prompt_batch` ({input_ids, attention_mask}: (B, P) left padded, optionally
        prompt_messages / extra), rollout.n_samples_per_prompt responses per prompt, then score them.

        Old log-probs come from the actor's training forward, not from the sampler, so the first ratio is
        exactly 1; the sampler's log-probs are kept only to log the mismatch."""
        prompts = repeat_rows(prompt_batch, self.cfg.rollout.n_samples_per_prompt)
        start = time.perf_counter()
        out = self.rollout(prompts, self._rollout_config())
        self.timings["time_generation"] += time.perf_counter() - start
        start = time.perf_counter()
        exp = self._score(prompts, out)
        self.timings["time_scoring"] += time.perf_counter() - start
        return exp

    def _score(self, prompts: dict, out: GenerationOutput) -> Experience:
        e, temperature = self.engine, self.cfg.rollout.temperature
        prompt_len, mask = prompts["input_ids"].shape[1], out.response_mask
        seqs = out.sequences
        attention = torch.cat([prompts["attention_mask"].to(mask.device), mask], dim=1)
        logprobs = e.actor.logprobs(seqs, attention, prompt_len, temperature)[0]
        ref_logprobs = e.reference_logprobs(seqs, attention, prompt_len, temperature)
        values = e.critic.values(seqs, attention, prompt_len) if e.critic is not None else None
        scores, parts = self.reward(self._responses(prompts, out, attention))
        kl = masked_sum(kl_penalty(logprobs, ref_logprobs, "k1") * mask, mask, dim=1)  # (B,) per response
        stats = {
            "reward": scores.mean().item(),
            **{f"reward_{k}": v.float().mean().item() for k, v in parts.items()},
            "kl": kl.mean().item(),
            "kl_median": kl.median().item(),
            "response_length": mask.float().sum(1).mean().item(),
            "no_eos_frac": (~out.finished.bool()).float().mean().item(),
            "logprob_mismatch": masked_mean((logprobs - out.logprobs).abs(), mask).item(),
        }
        exp = Experience(
            sequences=seqs, attention_mask=attention, response_mask=mask, prompt_len=prompt_len,
            logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
            rewards=torch.zeros_like(logprobs), advantages=torch.zeros_like(logprobs), stats=stats,
        )  # fmt: skip
        return self._advantages(exp)

    def _advantages(self, exp: Experience) -> Experience:
        """Per-token rewards, then the advantages of the configured estimator (and PPO's returns)."""
        algo, mask = self.cfg.algorithm, exp.response_mask
        beta = 0.0 if algo.kl_in_loss else self.kl_ctl.value
        rewards, _ = compute_token_rewards(
            exp.scores, exp.logprobs, exp.ref_logprobs, mask, beta, kl_kind="k1"
        )
        returns = None
        if algo.name == "ppo":
            advantages, returns = compute_gae(rewards, exp.values, mask, 1.0, algo.lam)
            advantages = masked_whiten(advantages, mask)
        elif algo.name == "reinforce++":
            advantages = reinforce_pp_advantages(rewards, mask)
        else:
            per_response = group_advantages(rewards.sum(1), self.cfg.rollout.n_samples_per_prompt, algo.name)
            advantages = per_response[:, None] * mask.to(per_response.dtype)
        return dataclasses.replace(exp, rewards=rewards, advantages=advantages, returns=returns)

    def _responses(self, prompts: dict, out: GenerationOutput, attention: torch.Tensor) -> Responses:
        """What the rewards read: texts, the prompt conversations and the source rows' other columns."""
        prompt_len = prompts["input_ids"].shape[1]
        responses = [
            self.tokenizer.decode(row[prompt_len:][m.bool()], skip_special_tokens=True)
            for row, m in zip(out.sequences, out.response_mask)
        ]
        if "prompt_messages" in prompts:
            messages = [json.loads(m) for m in prompts["prompt_messages"]]
        else:  # the Python API may hand token ids only: the decoded prompt stands for its one user turn
            texts = self.tokenizer.batch_decode(prompts["input_ids"], skip_special_tokens=True)
            messages = [[{"role": "user", "content": t}] for t in texts]
        extras = [json.loads(x) for x in prompts.get("extra", ["{}"] * len(messages))]
        keys = sorted({k for x in extras for k in x})
        fields = {k: [x.get(k) for x in extras] for k in keys}
        last_user = [next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in messages]
        return Responses(
            out.sequences, attention, prompt_len, out.finished.bool(), last_user, responses, messages, fields
        )

    # --- one iteration, part 2: the update -------------------------------------------------------------
    def train_rlhf(self, experience: Experience) -> dict[str, float]:
        """algorithm.epochs x num_minibatches updates: per mini-batch one actor step (and one critic step).

        Returns this rank's means over the update, `ratio_first` / `clip_frac_first` of the first mini-batch
        of the first epoch (1 and 0 by construction), and the rollout statistics of `experience`."""
        start = time.perf_counter()
        algo = self.cfg.algorithm
        sums: dict[str, float] = {}
        n, first = 0, {}
        for _ in range(algo.epochs):
            for batch in experience.minibatches(algo.num_minibatches, generator=self.shuffler):
                batch = batch.trimmed()  # only this mini-batch's own padding is computed
                stats = self._actor_step(batch)
                if self.engine.critic is not None:
                    stats.update(self._critic_step(batch))
                first = first or {"ratio_first": stats["ratio_mean"], "clip_frac_first": stats["clip_frac"]}
                sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
                n += 1
        self._sync_backend()
        # One coefficient on every rank: the controller sees the KL averaged over all of them.
        kl = all_reduce_sum(torch.tensor([experience.stats["kl"], 1.0], dtype=torch.float64))
        self.kl_ctl.update((kl[0] / kl[1]).item(), experience.size * self.dp.world_size)
        self.timings["time_training"] += time.perf_counter() - start
        means = {k: v / n for k, v in sums.items()}
        return {**experience.stats, **means, **first, "kl_coef": self.kl_ctl.value}

    def _actor_step(self, batch: Experience) -> dict[str, float]:
        actor, algo, mask = self.engine.actor, self.cfg.algorithm, batch.response_mask
        agg, max_len = self._loss_agg(), self.cfg.rollout.max_new_tokens
        logp, entropy = actor.logprobs(
            batch.sequences,
            batch.attention_mask,
            batch.prompt_len,
            self.cfg.rollout.temperature,
            with_entropy=True,
        )
        loss, stats = policy_loss(logp, batch.logprobs, batch.advantages, mask, algo.clip_range, agg, max_len)
        kl_loss = torch.zeros(())
        if algo.kl_in_loss:
            kl_loss = aggregate(kl_penalty(logp, batch.ref_logprobs, "k3"), mask, agg, max_len)
        ptx_loss = self._ptx_loss() if self.ptx is not None else torch.zeros(())
        total = loss + self.kl_ctl.value * kl_loss + self.cfg.ptx.coef * ptx_loss
        skip = self.guards["actor"].should_skip(total, self.step + 1)
        with zeroed_gradients(actor.module, enabled=skip):
            actor.backward(finite_or_zero(total, logp) if skip else total)
        actor.step()
        if self.ema is not None:
            self.ema.update(actor.module)
        out = {
            "policy_loss": loss.item(), "entropy": masked_mean(entropy, mask).item(),
            "clip_frac": stats["clip_frac"].item(), "approx_kl": stats["approx_kl"].item(),
            "ratio_mean": stats["ratio_mean"].item(), "grad_norm_actor": actor.grad_norm or 0.0,
        }  # fmt: skip
        # Terms that are off are not logged: a flat zero curve would read as a measured value.
        if algo.kl_in_loss:
            out["kl_loss"] = kl_loss.item()
        if self.ptx is not None:
            out["ptx_loss"] = ptx_loss.item()
        return out

    def _loss_agg(self) -> str:
        algo = self.cfg.algorithm
        if algo.loss_agg != "auto":
            return algo.loss_agg
        return {"grpo": "seq_mean", "dr_grpo": "seq_sum"}.get(algo.name, "token_mean")

    def _ptx_loss(self) -> torch.Tensor:
        """Token-mean LM loss of the next PTX micro-batch (InstructGPT's PPO-ptx)."""
        loss_sum, n_tokens = self.engine.actor.lm_loss(self.ptx.next())
        return loss_sum / n_tokens.clamp(min=1)

    def _critic_step(self, batch: Experience) -> dict[str, float]:
        critic = self.engine.critic
        values = critic.values(batch.sequences, batch.attention_mask, batch.prompt_len)
        loss, stats = value_loss(
            values, batch.values, batch.returns, batch.response_mask, self.cfg.algorithm.clip_range
        )
        skip = self.guards["critic"].should_skip(loss, self.step + 1)
        with zeroed_gradients(critic.module, enabled=skip):
            critic.backward(finite_or_zero(loss, values) if skip else loss)
        critic.step()
        return {"value_loss": loss.item(), "vf_clip_frac": stats["vf_clip_frac"].item()}

    # --- the standard loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """`chatforge ppo`: iterations of rollout + update, evaluations with the over-optimisation guard,
        checkpoints, the KL budget, and the exports (the best checkpoint by the gold signal, the last one,
        the EMA actor, the critic)."""
        from chatforge.data import PromptCollator, load_step_data

        c, t = self.cfg, self.cfg.train
        run = RunDir.create(t.output_dir, t.final_model_dir, default_model="actor")
        run.claim("ppo", self.dist.is_main, t.resume)
        seed_everything(t.seed)
        if self.dist.is_main:
            save_yaml(c, run.config)
        data = load_step_data(c.data, self.tokenizer, "ppo")
        self.collate = PromptCollator(self.tokenizer)
        schedule = BatchSchedule(
            len(data.train), c.rollout.batch_size, 1, self.dp.rank, self.dp.world_size, t.seed
        )
        schedule.require_one_step("PPO prompt")
        self.run, self.schedule = run, schedule
        self.metrics = MetricsLogger(run, self.dist.is_main, t.report_to, to_dict(c))
        self.eval_rows = eval_rows(data, c.eval.prompts, self.dp.rank, self.dp.world_size)
        if len(data.eval) == 0:
            log.warning("ppo: no held-out prompts (data.eval_fraction=0): evaluations use training prompts")
        self.best: dict = {}
        self.baseline: dict = {}
        self.recent_kl: list[float] = []  # the KL limit's window, checkpointed so a resume stops alike
        self.step = self._resume() if t.resume else 0
        log.info("ppo (%s): %d prompts, %d per iteration, %d iterations", c.algorithm.name, len(data.train),
                 c.rollout.batch_size * self.dp.world_size, t.max_steps)  # fmt: skip
        if self.step == 0:
            self._evaluate_and_keep()
        if self._loop(data):  # the KL budget stopped the run: back to the last checkpoint within it
            state = load_checkpoint(run, self._checkpointed_engines(), {"sampler": self.sampler})
            self.step = state["step"]
        final = self.evaluate(self.step)
        self._consider(final)  # the last actor competes for the export too
        self._export(final)
        run.mark_done(self.dist.is_main, self.step, final)
        self.metrics.close()
        return final

    def _loop(self, data) -> bool:
        """Iterations until train.max_steps; True when the KL budget stopped the run."""
        t, limit = self.cfg.train, self.cfg.algorithm.kl_limit
        bar = Progress(t.max_steps, "ppo", self.dist.is_main, initial=self.step)
        windows = self.schedule.windows()
        while self.step < t.max_steps:
            (idx,) = next(windows)
            self.timings = dict.fromkeys(self.timings, 0.0)
            experience = self.generate_experience(self.collate([data.train[j] for j in idx]))
            # Mini-batch order depends on (seed, iteration) only, so a resumed run shuffles like an unbroken one.
            self.shuffler.manual_seed(t.seed * 1_000_003 + self.step)
            stats = rank_mean({**self.train_rlhf(experience), **self.timings})
            self.step += 1
            bar.update(1, reward=stats["reward"], kl=stats["kl"])
            actor = self.engine.actor
            self.metrics.log("train", self.step, {**stats, "lr_actor": actor.lr})
            # The limit judges the typical response (median) over KL_WINDOW iterations: a few responses the
            # reference finds unlikely (20-60 nats each) lift one batch's mean KL past 3 on healthy runs.
            self.recent_kl = (self.recent_kl + [stats["kl_median"]])[-KL_WINDOW:]
            window_kl = sum(self.recent_kl) / len(self.recent_kl)
            if limit is not None and window_kl > limit:
                self._kl_stop(window_kl, limit)
                bar.close()
                return True
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                self._evaluate_and_keep()
            elif t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self._save()
            maybe_die(self.step)
        bar.close()
        return False

    def _kl_stop(self, kl: float, limit: float) -> None:
        log.warning(
            "KL to the reference reached %.2f nats per response (median response, mean of the last iterations), past algorithm.kl_limit=%.2f: the policy is "
            "leaving the region where the reward can be trusted. Stopping at iteration %d and restoring the "
            "last checkpoint within the budget.", kl, limit, self.step,
        )  # fmt: skip
        self.metrics.log("guard", self.step, {"kl_limit_stop": 1.0, "kl": kl})

    # --- evaluation and the over-optimisation guard -------------------------------------------------------
    def _evaluate_and_keep(self) -> None:
        """Evaluate; keep a checkpoint when it is the best for the export so far, or as the KL budget's
        fallback (the last one within budget)."""
        is_best = self._consider(self.evaluate(self.step))
        if is_best or self.cfg.algorithm.kl_limit is not None or self.cfg.train.save_every:
            self._save()

    def _consider(self, result: dict) -> bool:
        """Make this evaluation the export's choice when trainers/export_choice.py says so; True when it did."""
        gold, bound = self._gold_key(result), max_drift(self.cfg.algorithm.kl_target)
        learned = bool(self.cfg.reward.models)
        if not may_compete(result, self.baseline, gold, bound, learned):
            return False
        key = export_key(result, gold)
        chosen = choose(self.best, self.step, result[key], result.get(f"stderr_{key}", 0.0))
        if chosen is None:
            return False
        by = gold or (f"held-out reward with the reference drift within {bound:g} nats" if learned else key)
        self.best = {**chosen, "tag": f"step{self.step}", "by": by}
        return True

    def _gold_key(self, result: dict) -> str | None:
        """The metric the best checkpoint is chosen by: the first gold signal's score on sampled responses
        (on greedy ones when eval.samples is 0)."""
        kind = judged_kind(result)
        return next((k for k in result if k.startswith("gold:") and k.endswith(f"_{kind}")), None)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out prompts: a greedy response and eval.samples sampled ones per prompt, scored by the proxy
        reward, the gold signals and the KL to the reference; diversity of the responses; warnings when the
        reward rises while diversity or the gold signal fall, or the KL passes its target."""
        e = self.cfg.eval
        greedy = dataclasses.replace(self._rollout_config(), do_sample=False)
        sampling = self._rollout_config()
        generator = torch.Generator(device=self.engine.actor.device).manual_seed(10_007 + self.dist.rank)
        parts: dict[str, list] = {"greedy": [], "sampled": []}
        size = self.cfg.rollout.batch_size
        for i in range(0, len(self.eval_rows), size):
            batch = self.collate(self.eval_rows[i : i + size])
            parts["greedy"].append(self._eval_batch(batch, greedy, generator))
            if e.samples:
                parts["sampled"].append(self._eval_batch(repeat_rows(batch, e.samples), sampling, generator))
        result = {}
        for kind, batches in parts.items():
            if batches:
                result.update(self._eval_summary(kind, batches))
        result.update(self._guard_signals(result))
        self.metrics.log("eval", step, result)
        self._write_samples(step, parts["greedy"])
        return result

    def _eval_batch(self, batch: dict, generation: GenerationConfig, generator) -> dict:
        out = self.rollout(batch, generation, generator)
        prompt_len, mask = batch["input_ids"].shape[1], out.response_mask
        attention = torch.cat([batch["attention_mask"].to(mask.device), mask], dim=1)
        temperature = self.cfg.rollout.temperature
        logp = self.engine.actor.logprobs(out.sequences, attention, prompt_len, temperature)[0]
        ref = self.engine.reference_logprobs(out.sequences, attention, prompt_len, temperature)
        responses = self._responses(batch, out, attention)
        row = {
            "reward": self.reward(responses)[0].float().cpu(),
            "kl": masked_sum(kl_penalty(logp, ref, "k1"), mask, dim=1).float().cpu(),
            "ref_nll": -masked_sum(ref, mask, dim=1).float().cpu(),
            "length": mask.float().sum(1).cpu(),
            "tokens": [r[m.bool()].tolist() for r, m in zip(out.sequences[:, prompt_len:], mask)],
            "texts": responses.responses,
            "prompts": responses.prompts,
        }
        for name, signal in self.gold.items():
            row[name] = signal(responses)[0].float().cpu()
        return row

    def _eval_summary(self, kind: str, batches: list[dict]) -> dict[str, float]:
        """Means over every rank of each per-response value, and the diversity of all ranks' responses."""
        keys = [k for k in batches[0] if k not in ("tokens", "texts", "prompts")]
        scored = [k for k in keys if k == "reward" or k.startswith("gold:")]  # what the export is chosen by
        local = torch.tensor(
            [sum(float(b[k].sum()) for b in batches) for k in keys]
            + [sum(float(b[k].double().square().sum()) for b in batches) for k in scored]
            + [sum(len(b["texts"]) for b in batches)],
            dtype=torch.float64,
        )
        sums = all_reduce_sum(local) / self.sp.size
        n = max(sums[-1].item(), 1.0)
        out = {f"{k}_{kind}": sums[i].item() / n for i, k in enumerate(keys)}
        for j, k in enumerate(scored):  # standard error of the mean over responses
            variance = max(sums[len(keys) + j].item() / n - out[f"{k}_{kind}"] ** 2, 0.0)
            out[f"stderr_{k}_{kind}"] = math.sqrt(variance / n)
        nll = gather_objects([v for b in batches for v in b["ref_nll"].tolist()], self.sp.size)
        out[f"ref_nll_median_{kind}"] = float(torch.tensor(nll).median()) if nll else 0.0
        tokens = gather_objects([t for b in batches for t in b["tokens"]], self.sp.size)
        out[f"distinct_1_{kind}"] = distinct_n(tokens, 1)
        out[f"distinct_2_{kind}"] = distinct_n(tokens, 2)
        out[f"identical_share_{kind}"] = identical_share(tokens)
        return out

    def _guard_signals(self, result: dict) -> dict[str, float]:
        """Compare with the first evaluation (the SFT model): reward gain per nat of KL, and warnings."""
        if not self.baseline:
            self.baseline = dict(result)
            return {}
        base, kind = self.baseline, judged_kind(result)
        gain = result[f"reward_{kind}"] - base[f"reward_{kind}"]
        kl = result[f"kl_{kind}"]
        signals = {"reward_gain": gain, "reward_gain_per_kl": gain / max(kl, 1e-3)}
        drift, bound = reference_drift(result, base), max_drift(self.cfg.algorithm.kl_target)
        gold = self._gold_key(result)
        if drift is not None:
            signals["ref_drift"] = drift
        warnings = []
        # Collapse = the same greedy reply to different questions (a sampled policy that grows confident on
        # each question is learning, not collapsing, so sampled diversity is reported but not judged).
        distinct = 1 - result["identical_share_greedy"]
        collapsed = distinct < 0.5 * (1 - base["identical_share_greedy"])
        collapsed |= result["distinct_2_greedy"] < 0.5 * base["distinct_2_greedy"]
        if gain > 0 and collapsed:
            warnings.append(
                f"the reward rose while the greedy replies collapsed ({distinct:.0%} of held-out prompts get a "
                f"reply of their own, {1 - base['identical_share_greedy']:.0%} for the SFT model)"
            )
        # Only a learned reward has blind spots to drift into; RL on rule rewards may rightly leave the SFT model.
        if gain > 0 and drift is not None and bound is not None and drift > bound and self.cfg.reward.models:
            warnings.append(
                f"the reward rose while the SFT model finds the median {kind} response {drift:.2f} nats less "
                f"likely than its own (past {bound:g}, half the KL target)"
                + ("" if gold else ": this evaluation cannot be the exported one")
            )
        target = self.cfg.algorithm.kl_target
        if target is not None and kl > 1.5 * target:
            warnings.append(f"KL {kl:.2f} nats per response is past 1.5x the target {target:g}")
        if gold is not None and gain > 0 and result[gold] < base[gold] - 0.02 * max(1.0, abs(base[gold])):
            warnings.append(f"the reward rose while {gold} fell ({base[gold]:.3g} -> {result[gold]:.3g})")
        for text in warnings:
            log.warning("possible reward hacking at iteration %d: %s", self.step, text)
        signals["warnings"] = float(len(warnings))
        return signals

    def _write_samples(self, step: int, greedy: list[dict]) -> None:
        """The first held-out prompts' greedy responses (prompt, response, reward, gold) to samples.jsonl; the
        ones of step 0 are the SFT model's, so the report can put the two side by side."""
        if not self.dist.is_main or not greedy:
            return
        b = greedy[0]
        with self.run.samples.open("a") as f:
            for i in range(min(SAMPLE_ROWS, len(b["texts"]))):
                record = {
                    "step": step,
                    "prompt": b["prompts"][i],
                    "response": b["texts"][i],
                    "reward": float(b["reward"][i]),
                }
                record.update({k: float(b[k][i]) for k in b if k.startswith("gold:")})
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- checkpoints and exports -------------------------------------------------------------------------
    def _checkpointed_engines(self) -> dict:
        engines = {"actor": self.engine.actor}
        if self.engine.critic is not None:
            engines["critic"] = self.engine.critic
        return engines

    def _save(self) -> None:
        shared = {
            "step": self.step, "prompt_position": list(self.schedule.position), "kl_coef": self.kl_ctl.value,
            "ptx_position": self.ptx.position if self.ptx is not None else None, "best": self.best,
            "baseline": self.baseline, "ema": self.ema.state_dict() if self.ema is not None else None,
            "recent_kl": self.recent_kl,
        }  # fmt: skip
        keep = (self.best["tag"],) if self.best else ()
        save_checkpoint(
            self.run,
            self._checkpointed_engines(),
            f"step{self.step}",
            shared,
            {"sampler": self.sampler},
            keep,
        )

    def _resume(self) -> int:
        state = load_checkpoint(self.run, self._checkpointed_engines(), {"sampler": self.sampler})
        if state is None:
            log.info("no checkpoint in %s; starting from scratch", self.run.checkpoints)
            return 0
        self.schedule.position = tuple(state["prompt_position"])
        if self.ptx is not None and state["ptx_position"] is not None:
            self.ptx.position = state["ptx_position"]
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.kl_ctl.value, self.best, self.baseline = state["kl_coef"], state["best"], state["baseline"]
        self.recent_kl = state.get("recent_kl", [])  # checkpoints written before the window was saved
        return state["step"]

    def _export(self, final: dict) -> None:
        """The final model (the evaluation chosen by trainers/export_choice.py; the last actor when none
        was), the last one as <output_dir>/actor-last when they differ, the EMA actor and the critic."""
        self._save()
        with naming_a_full_disk(self.run, f"the models in {self.run.root}", "actor"):
            self._write_models()

    def _write_models(self) -> None:
        actor, run = self.engine.actor, self.run
        if self.ema is not None:
            self.ema.save(actor.module, f"{run.final_model}-ema", self.tokenizer)
        if self.engine.critic is not None:
            self.engine.critic.save_hf(run.root / "critic", self.tokenizer)
        if self.best and self.best["step"] != self.step:
            actor.save_hf(run.root / "actor-last", self.tokenizer)
            load_checkpoint(
                run, self._checkpointed_engines(), {"sampler": self.sampler}, tag=self.best["tag"]
            )
            by = self.best.get("by", "the gold signal")  # checkpoints written before "by" was saved
            log.warning("exporting iteration %d as %s, chosen by %s (%.4g: the latest evaluation within one "
                        "standard error of the best); the last iteration's actor is in %s", self.best["step"],
                        run.final_model, by, self.best["score"], run.root / "actor-last")  # fmt: skip
            self.metrics.log("guard", self.step, {"exported_step": float(self.best["step"])})
        actor.save_hf(run.final_model, self.tokenizer)


def repeat_rows(batch: dict, n: int) -> dict:
    """Each prompt n times in a row (groups of n consecutive responses to one prompt)."""
    if n == 1:
        return batch
    out = {}
    for key, value in batch.items():
        out[key] = (
            value.repeat_interleave(n, dim=0)
            if torch.is_tensor(value)
            else [v for v in value for _ in range(n)]
        )
    return out


def eval_rows(data, n_prompts: int, rank: int, world: int) -> list[dict]:
    """The same number of held-out prompts on every rank (ZeRO-3 forwards are collective)."""
    rows = data.eval if len(data.eval) > 0 else data.train
    n = min(n_prompts, len(rows)) // world * world
    return [rows[i] for i in range(rank, n, world)]


def rank_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank must call with the same keys)."""
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {k: (total[i] / world).item() for i, k in enumerate(keys)}


def gather_objects(items: list, group_size: int = 1) -> list:
    """Every data-parallel rank's list, concatenated (ranks of one sequence-parallel group, `group_size`
    consecutive ranks, hold the same items: one copy is kept)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return items
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for rank, part in enumerate(parts) if rank % group_size == 0 for x in part]


def build_trainer(config: PPOConfig) -> PPOTrainer:
    """`chatforge ppo`: the engines from the config, then the trainer."""
    return PPOTrainer(RLHFEngine(config), config)
