"""Step 2: pairwise reward model. `RewardTrainer(config).fit()` mirrors `chatforge reward`.

Loss: -log sigmoid(r_chosen - r_rejected) (InstructGPT eq. 1), the score read at each sequence's last
real token. At the end, the mean/std of scores on the held-out pairs are saved beside the model
(`reward_stats.json`) so step 3 can normalise rewards.
"""

from __future__ import annotations

import contextlib
import json

import torch

from chatforge.algorithms import pairwise_loss
from chatforge.config import RewardConfig
from chatforge.engine import all_reduce_sum, barrier
from chatforge.engine.sequence_parallel import shard_batch, sp_sequence_scores
from chatforge.models.loading import load_scorer
from chatforge.models.value import sequence_scores

from .common import (
    eval_batches,
    pad_collective_forwards,
    zeroed_gradients,
)
from .step_loop import finish_step, run_step_loop, setup_step

STATS_FILE = "reward_stats.json"


class RewardTrainer:
    def __init__(self, config: RewardConfig):
        from chatforge.data import PairCollator

        self.cfg = config
        s = setup_step(config, "reward", PairCollator, load_scorer, trainable_heads=("score",))
        self.dist, self.sp, self.dp, self.run = s.dist, s.sp, s.dp, s.run
        self.tokenizer, self.data, self.collate, self.schedule = s.tokenizer, s.data, s.collate, s.schedule
        self.engine, self.metrics, self.guard = s.engine, s.metrics, s.guard
        self.global_batch_size, self.total_steps = s.global_batch_size, s.total_steps
        self.step = 0

    def _scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and (B,) rejected scores of a PairCollator batch.

        Under SP each rank scores its sequence shard; the rank holding a row's last real token supplies
        its score to the whole group, so every rank of the group computes the same pairwise loss."""
        ids, mask = batch["input_ids"].to(self.engine.device), batch["attention_mask"].to(self.engine.device)
        if self.sp.enabled:
            local = shard_batch({"input_ids": ids, "attention_mask": mask}, self.sp)
            return sp_sequence_scores(self.engine.module, local, self.sp, forward=self.engine).chunk(2)
        scores = sequence_scores(self.engine.module, ids, mask, forward=self.engine)
        return scores.chunk(2)

    def fit(self) -> dict:
        run_step_loop(self, "reward", "pairs")
        final = self.evaluate(keep_scores=True)
        scores = final.pop("scores")
        finish_step(self, final, before_done=lambda: self._save_score_stats(scores))
        return final

    def _train_step(self, window: list[dict]) -> dict:
        """One optimizer step over equal-size micro-batches (so the mean of means is the pair mean)."""
        sums = torch.zeros(2)
        for batch in window:
            chosen, rejected = self._scores(batch)
            loss, stats = pairwise_loss(chosen, rejected)
            skip = self.guard.should_skip(loss, self.step + 1)
            if skip:
                loss = 0.0 * (
                    chosen.nan_to_num(0.0, 0.0, 0.0).sum() + rejected.nan_to_num(0.0, 0.0, 0.0).sum()
                )
            with zeroed_gradients(self.engine.module) if skip else contextlib.nullcontext():
                self.engine.backward(loss)
            self.engine.step()
            sums += torch.tensor([loss.item(), float(stats["accuracy"])])
        sums = all_reduce_sum(sums) / (len(window) * self.dist.world_size)
        return {"loss": sums[0].item(), "accuracy": sums[1].item()}

    @torch.no_grad()
    def evaluate(self, keep_scores: bool = False) -> dict:
        """Accuracy, mean chosen/rejected score and margin over every held-out pair (all ranks)."""
        self.engine.eval()
        mb, n_eval = self.cfg.train.micro_batch_size, len(self.data.eval)
        chosen_all, rejected_all = [], []
        for idx in eval_batches(n_eval, mb, self.dp.rank, self.dp.world_size):
            chosen, rejected = self._scores(self.collate([self.data.eval[j] for j in idx]))
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
        dummy = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.engine.device)
        pad_collective_forwards(
            self.cfg.engine.zero_stage,
            self.dp,
            n_eval,
            mb,
            lambda: self._scores(
                {"input_ids": dummy.repeat(2, 1), "attention_mask": torch.ones_like(dummy).repeat(2, 1)}
            ),
        )
        self.engine.train()
        c = torch.cat(chosen_all) if chosen_all else torch.zeros(0)
        r = torch.cat(rejected_all) if rejected_all else torch.zeros(0)
        both = torch.cat([c, r])
        sums = all_reduce_sum(torch.tensor([
            float(c.numel()), float((c > r).sum()), float(c.sum()), float(r.sum()),
            float(-torch.nn.functional.logsigmoid(c - r).sum()), float(both.sum()), float((both**2).sum()),
        ]))  # fmt: skip
        sums /= self.sp.size  # every rank of a sequence-parallel group holds the same scores
        n = max(sums[0].item(), 1.0)
        result = {
            "accuracy": sums[1].item() / n,
            "chosen_mean": sums[2].item() / n,
            "rejected_mean": sums[3].item() / n,
            "margin": (sums[2] - sums[3]).item() / n,
            "loss": sums[4].item() / n,
        }
        self.metrics.log("eval", self.step, result)
        if keep_scores:
            mean = sums[5].item() / (2 * n)
            var = max(sums[6].item() / (2 * n) - mean**2, 0.0)
            result["scores"] = {"mean": mean, "std": var**0.5, "count": int(2 * n)}
        return result

    def _save_score_stats(self, stats: dict) -> None:
        """Score mean/std over held-out chosen and rejected responses, for reward normalisation."""
        if self.dist.is_main:
            (self.run.final_model / STATS_FILE).write_text(json.dumps(stats, indent=2))
        barrier()
