"""Step 1: supervised fine-tuning. `SFTTrainer(config).fit()` mirrors `chatforge sft`.

Read top to bottom: set-up (data, engine), one optimizer step (token-weighted over micro-batches and
ranks, NaN guard), evaluation; the loop and the export are the offline steps' shared ones.
"""

from __future__ import annotations

import math

import torch

from chatforge.config import SFTConfig
from chatforge.data.tokenize import IGNORE_INDEX
from chatforge.engine import ModelSpec, TrainEngine, all_reduce_sum
from chatforge.models.loading import LoadOptions, load_causal_lm

from .guard import finite_or_zero, zeroed_gradients
from .offline_loop import finish_offline, run_offline_loop, setup_offline
from .schedule import eval_batches, pad_collective_forwards


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the next-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class SFTTrainer:
    def __init__(self, config: SFTConfig):
        from chatforge.data import SFTCollator

        self.cfg = config
        self.setup = s = setup_offline(config, "sft", "sft", SFTCollator)
        self.dist, self.sp, self.dp, self.run = s.dist, s.sp, s.dp, s.run
        self.tokenizer, self.data, self.collate = s.tokenizer, s.data, s.collate
        spec = ModelSpec.trained(config.model, config.engine, config.optim, dropout=config.model.dropout)
        opts = LoadOptions(
            config.engine.trust_remote_code, config.engine.attn_implementation, config.model.dropout
        )
        pad = self.tokenizer.pad_token_id
        self.engine = TrainEngine(
            lambda dtype: load_causal_lm(spec.name_or_path, opts, dtype, pad), spec,
            micro_batch_size=config.batch.micro_batch_size,
            gradient_accumulation_steps=config.batch.gradient_accumulation_steps,
            total_steps=s.total_steps, dist=s.dist,
        )  # fmt: skip
        self.engines = {"model": self.engine}
        self.step = 0

    def fit(self) -> dict:
        run_offline_loop(self, "sft", "rows")
        final = self.evaluate()
        finish_offline(self, final)
        return final

    def _train_step(self, window: list[dict]) -> dict:
        """One optimizer step; the loss is the exact token mean over the window on all ranks.

        DeepSpeed's gradient is (1 / (dp * accumulation)) * sum over all ranks and micro-batches of
        the gradients of the backward losses; under Ulysses an SP rank's gradient is the part of its
        group's gradient that flows through its shard, so summing over a group gives the gradient of
        the group's summed token loss. Backward losses of (shard loss sum) * dp * accumulation / N,
        N = loss tokens in the global batch, therefore give the gradient of the global token mean.
        """
        # Every rank of an SP group counts its group's whole rows, hence the division by its size.
        n_local = torch.tensor(float(sum(count_loss_tokens(b["labels"]) for b in window)))
        n_tokens = all_reduce_sum(n_local) / self.sp.size
        scale = (self.dp.world_size * len(window) / n_tokens.clamp(min=1)).item()
        total = torch.zeros(())
        for batch in window:
            loss_sum, _ = self.engine.lm_loss(batch)
            skip = self.setup.guard.should_skip(loss_sum, self.step + 1)
            with zeroed_gradients(self.engine.module, enabled=skip):
                # A skipped batch still runs backward, so ZeRO's gradient hooks stay in step on all ranks.
                self.engine.backward((finite_or_zero(loss_sum) if skip else loss_sum) * scale)
            self.engine.step()
            total += 0.0 if skip else loss_sum.detach().float().cpu()
        return {"loss": (all_reduce_sum(total) / n_tokens.clamp(min=1)).item()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean loss and perplexity on the held-out split (every row once over all ranks); an empty
        split is reported as such, not as loss 0."""
        sums = torch.zeros(2)
        mb, n_eval = self.cfg.batch.micro_batch_size, len(self.data.eval)
        for idx in eval_batches(n_eval, mb, self.dp.rank, self.dp.world_size):
            loss_sum, n = self.engine.lm_loss(self.collate([self.data.eval[j] for j in idx]))
            sums += torch.tensor([float(loss_sum), float(n)])
        dummy = torch.full((1, 1), self.tokenizer.pad_token_id)
        dummy_batch = {"input_ids": dummy, "attention_mask": torch.ones_like(dummy), "labels": dummy}
        pad_collective_forwards(
            self.cfg.model.zero_stage, self.dp, n_eval, mb, lambda: self.engine.lm_loss(dummy_batch)
        )
        sums = all_reduce_sum(sums)
        if sums[1] == 0:
            result = {"tokens": 0.0}
        else:
            loss = (sums[0] / sums[1]).item()
            result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums[1].item()}
        self.setup.metrics.log("eval", self.step, result)
        return result
