"""DPO: direct preference optimisation (Rafailov et al. 2023), the offline alternative to steps 2 + 3.
`DPOTrainer(config).fit()` mirrors `chatforge dpo`.

The policy is trained on preference pairs against a frozen reference: the step-1 model (a second copy), or
with `policy.lora_r` > 0 the policy's own base with its adapters disabled (no second copy). Losses: DPO's
sigmoid loss, with label smoothing (cDPO), or IPO's squared loss. Data: the step-2 part of each dataset
(chosen/rejected pairs of any format), the replies cut at their first end-of-turn token.
"""

from __future__ import annotations

import torch

from chatforge.algorithms import dpo_loss
from chatforge.config import DPOConfig
from chatforge.engine import ModelSpec, TrainEngine, all_reduce_sum
from chatforge.models.loading import LoadOptions, load_causal_lm

from .guard import finite_or_zero, zeroed_gradients
from .offline_loop import finish_offline, run_offline_loop, setup_offline
from .schedule import eval_batches, pad_collective_forwards

STAT_KEYS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")


class DPOTrainer:
    def __init__(self, config: DPOConfig):
        from chatforge.data import PairCollator

        self.cfg = config
        self.setup = s = setup_offline(config, "dpo", "reward", PairCollator)
        self.dist, self.sp, self.dp, self.run = s.dist, s.sp, s.dp, s.run
        self.tokenizer, self.data, self.collate = s.tokenizer, s.data, s.collate
        eng, pad = config.engine, self.tokenizer.pad_token_id
        opts = LoadOptions(eng.trust_remote_code, eng.attn_implementation)
        spec = ModelSpec.trained(config.policy, eng, config.optim)
        self.policy = TrainEngine(
            lambda dtype: load_causal_lm(spec.name_or_path, opts, dtype, pad), spec,
            micro_batch_size=config.batch.micro_batch_size,
            gradient_accumulation_steps=config.batch.gradient_accumulation_steps,
            total_steps=s.total_steps, dist=s.dist,
        )  # fmt: skip
        self.ref = None
        if not config.policy.lora_r:
            ref = ModelSpec.frozen(config.ref.name_or_path, config.policy.zero_stage, eng)
            self.ref = TrainEngine(
                lambda dtype: load_causal_lm(ref.name_or_path, opts, dtype, pad), ref, dist=s.dist
            )
        self.engines = {"policy": self.policy}
        self.step = 0

    def fit(self) -> dict:
        run_offline_loop(self, "dpo", "pairs")
        final = self.evaluate()
        finish_offline(self, final)
        return final

    def _logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) policy and (2B,) reference log-probs of each reply (chosen rows first, then rejected)."""
        ids, mask, reply = (
            batch[k].to(self.policy.device) for k in ("input_ids", "attention_mask", "response_mask")
        )
        policy = self.policy.sequence_logprobs(ids, mask, reply)
        with torch.no_grad():
            if self.ref is not None:
                ref = self.ref.sequence_logprobs(ids, mask, reply)
            else:
                ref = self.policy.sequence_logprobs(ids, mask, reply, base=True)
        return policy, ref

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.cfg.dpo
        policy, ref = self._logps(batch)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        loss, stats = dpo_loss(pc, pr, rc, rr, d.beta, d.loss, d.label_smoothing)
        if d.sft_coef:
            chosen_tokens = batch["response_mask"].chunk(2)[0][:, 1:].sum(1).clamp(min=1).to(pc.device)
            loss = loss + d.sft_coef * (-pc / chosen_tokens).mean()
        stats.update(loss=loss.detach(), logp_chosen=pc.detach().mean(), logp_rejected=pr.detach().mean())
        return loss, stats

    def _train_step(self, window: list[dict]) -> dict:
        """One optimizer step over equal-size micro-batches (the mean of means is the pair mean)."""
        sums = torch.zeros(len(STAT_KEYS))
        for batch in window:
            loss, stats = self._loss(batch)
            skip = self.setup.guard.should_skip(loss, self.step + 1)
            with zeroed_gradients(self.policy.module, enabled=skip):
                self.policy.backward(finite_or_zero(loss) if skip else loss)
            self.policy.step()
            sums += torch.tensor([float(stats[k]) for k in STAT_KEYS]).nan_to_num(0.0)
        sums = all_reduce_sum(sums) / (len(window) * self.dist.world_size)
        return dict(zip(STAT_KEYS, sums.tolist()))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The same statistics, pair-weighted over every held-out pair (all ranks)."""
        mb, n_eval = self.cfg.batch.micro_batch_size, len(self.data.eval)
        sums = torch.zeros(len(STAT_KEYS) + 1)
        for idx in eval_batches(n_eval, mb, self.dp.rank, self.dp.world_size):
            _, stats = self._loss(self.collate([self.data.eval[j] for j in idx]))
            sums += torch.tensor([float(stats[k]) * len(idx) for k in STAT_KEYS] + [len(idx)])
        dummy = self.collate([{"chosen_input_ids": [0, 1], "rejected_input_ids": [0, 2], "prompt_len": 1}])
        pad_collective_forwards(self.cfg.policy.zero_stage, self.dp, n_eval, mb, lambda: self._loss(dummy))
        sums = all_reduce_sum(sums) / self.sp.size
        n = sums[-1].item()
        result = {k: v / n for k, v in zip(STAT_KEYS, sums[:-1].tolist())} if n else {"pairs": 0.0}
        self.setup.metrics.log("eval", self.step, result)
        return result
