"""Step 2: pairwise reward model. `RewardTrainer(config).fit()` mirrors `chatforge reward`.

Loss: -log sigmoid(r_chosen - r_rejected) (InstructGPT eq. 1), the score read at each sequence's last real
token: the reply's first end-of-turn token, the one step 3 scores. With `model.heads` = K > 1 the model has K
score heads, each trained on an online-bootstrap reweighting of the pairs (Poisson(1) weights per pair and
head), so the heads disagree where the data does not pin the reward down; step 3 can then be conservative
there. At the end the per-head mean/std of held-out scores are saved beside the model (`reward_stats.json`)
so step 3 normalises rewards.
"""

from __future__ import annotations

import json

import torch

from chatforge.algorithms import pairwise_loss
from chatforge.config import RewardConfig
from chatforge.engine import ModelSpec, TrainEngine, all_reduce_sum, barrier
from chatforge.models.loading import LoadOptions, load_scorer
from chatforge.rewards import REWARD_STATS_FILE

from .guard import finite_or_zero, zeroed_gradients
from .offline_loop import finish_offline, run_offline_loop, setup_offline
from .run_dir import log
from .schedule import eval_batches, pad_collective_forwards


class RewardTrainer:
    def __init__(self, config: RewardConfig):
        from chatforge.data import PairCollator

        self.cfg = config
        self.setup = s = setup_offline(config, "reward", "reward", PairCollator)
        self.dist, self.sp, self.dp, self.run = s.dist, s.sp, s.dp, s.run
        self.tokenizer, self.data, self.collate = s.tokenizer, s.data, s.collate
        m = config.model
        spec = ModelSpec.trained(m, config.engine, config.optim, dropout=m.dropout)
        opts = LoadOptions(config.engine.trust_remote_code, config.engine.attn_implementation, m.dropout)
        pad = self.tokenizer.pad_token_id
        self.engine = TrainEngine(
            lambda dtype: load_scorer(spec.name_or_path, opts, dtype, pad, heads=m.heads), spec,
            micro_batch_size=config.batch.micro_batch_size,
            gradient_accumulation_steps=config.batch.gradient_accumulation_steps,
            total_steps=s.total_steps, trainable_heads=("score",), dist=s.dist,
        )  # fmt: skip
        self.engines = {"model": self.engine}
        self.step = 0

    def _scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H) chosen and (B, H) rejected scores of a PairCollator batch (the engine shards under SP)."""
        ids, mask = batch["input_ids"].to(self.engine.device), batch["attention_mask"].to(self.engine.device)
        return self.engine.scores(ids, mask).chunk(2)

    def fit(self) -> dict:
        run_offline_loop(self, "reward", "pairs")
        final = self.evaluate(keep_scores=True)
        scores = final.pop("scores")
        finish_offline(self, final, before_done=lambda: self._save_score_stats(scores))
        return final

    def _train_step(self, window: list[dict]) -> dict:
        """One optimizer step over equal-size micro-batches (so the mean of means is the pair mean)."""
        sums = torch.zeros(2)
        for batch in window:
            chosen, rejected = self._scores(batch)
            loss, stats = self._loss(chosen, rejected)
            skip = self.setup.guard.should_skip(loss, self.step + 1)
            with zeroed_gradients(self.engine.module, enabled=skip):
                self.engine.backward(finite_or_zero(loss, chosen, rejected) if skip else loss)
            self.engine.step()
            sums += torch.tensor([0.0 if skip else loss.item(), float(stats["accuracy"])])
        sums = all_reduce_sum(sums) / (len(window) * self.dist.world_size)
        return {"loss": sums[0].item(), "accuracy": sums[1].item()}

    def _loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The pairwise loss of the mean head (one head), or the mean over heads of each head's
        bootstrap-weighted loss (an ensemble)."""
        if chosen.shape[1] == 1:
            return pairwise_loss(chosen[:, 0], rejected[:, 0])
        weights = torch.poisson(torch.ones_like(chosen))  # (B, H) online bootstrap (Oza 2001)
        per_pair = -torch.nn.functional.logsigmoid(chosen - rejected)
        loss = (weights * per_pair).sum(0).div(weights.sum(0).clamp(min=1)).mean()
        _, stats = pairwise_loss(chosen.mean(1), rejected.mean(1))
        return loss, stats

    @torch.no_grad()
    def evaluate(self, keep_scores: bool = False) -> dict:
        """Accuracy, mean chosen/rejected score and margin (of the mean head) over every held-out pair."""
        mb, n_eval = self.cfg.batch.micro_batch_size, len(self.data.eval)
        chosen_all, rejected_all = [], []
        for idx in eval_batches(n_eval, mb, self.dp.rank, self.dp.world_size):
            chosen, rejected = self._scores(self.collate([self.data.eval[j] for j in idx]))
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
        dummy = torch.full((2, 1), self.tokenizer.pad_token_id, device=self.engine.device)
        pad_collective_forwards(
            self.cfg.model.zero_stage, self.dp, n_eval, mb,
            lambda: self._scores({"input_ids": dummy, "attention_mask": torch.ones_like(dummy)}),
        )  # fmt: skip
        heads = self.cfg.model.heads
        c = torch.cat(chosen_all) if chosen_all else torch.zeros(0, heads)
        r = torch.cat(rejected_all) if rejected_all else torch.zeros(0, heads)
        result, stats = self._eval_sums(c, r)
        self.setup.metrics.log("eval", self.step, result)
        if keep_scores:
            result["scores"] = stats
        return result

    def _eval_sums(self, c: torch.Tensor, r: torch.Tensor) -> tuple[dict, dict]:
        """(metrics of the mean head, per-head score statistics) summed over every rank."""
        cm, rm, both = c.mean(1), r.mean(1), torch.cat([c, r])
        sums = all_reduce_sum(torch.tensor([
            float(cm.numel()), float((cm > rm).sum()), float(cm.sum()), float(rm.sum()),
            float(-torch.nn.functional.logsigmoid(cm - rm).sum()),
        ]))  # fmt: skip
        sums /= self.sp.size  # every rank of a sequence-parallel group holds the same scores
        n = sums[0].item()
        if n == 0:
            return {"pairs": 0.0}, {"mean": [0.0] * c.shape[1], "std": [1.0] * c.shape[1], "count": 0}
        result = {
            "accuracy": sums[1].item() / n,
            "chosen_mean": sums[2].item() / n,
            "rejected_mean": sums[3].item() / n,
            "margin": (sums[2] - sums[3]).item() / n,
            "loss": sums[4].item() / n,
        }
        # Two passes in float64: E[x^2] - E[x]^2 cancels badly when the scores sit far from 0.
        both = both.double()
        mean = all_reduce_sum(both.sum(0)) / self.sp.size / (2 * n)
        var = all_reduce_sum(((both - mean) ** 2).sum(0)) / self.sp.size / (2 * n)
        return result, {"mean": mean.tolist(), "std": var.sqrt().tolist(), "count": int(2 * n)}

    def _save_score_stats(self, stats: dict) -> None:
        """Per-head score mean/std over held-out chosen and rejected responses, for reward normalisation.
        Without held-out pairs there are no statistics: no file (step 3 then uses raw scores), said once."""
        if self.dist.is_main and stats["count"] == 0:
            log.warning(
                "reward: no held-out pairs (data.eval_fraction=0 or a tiny step-2 split), so no %s: step 3 "
                "will use raw scores", REWARD_STATS_FILE,
            )  # fmt: skip
        elif self.dist.is_main:
            (self.run.final_model / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=2))
        barrier()
