"""Step 1: supervised fine-tuning. `SFTTrainer(config).fit()` mirrors `chatforge sft`.

Read top to bottom: set-up (data, engine), the loop (token-weighted micro-batches, NaN guard, eval,
checkpoints), then the final export.
"""

from __future__ import annotations

import contextlib
import math

import torch

from chatforge.algorithms import sft_loss
from chatforge.config import SFTConfig
from chatforge.engine import all_reduce_sum
from chatforge.engine.sequence_parallel import (
    shard_batch,
    sharded_sft_loss,
    sp_model_inputs,
)
from chatforge.models.loading import load_causal_lm

from .common import (
    eval_batches,
    pad_collective_forwards,
    zeroed_gradients,
)
from .step_loop import finish_step, run_step_loop, setup_step


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the next-token shift."""
    return int((labels[:, 1:] != -100).sum())


class SFTTrainer:
    def __init__(self, config: SFTConfig):
        from chatforge.data import SFTCollator

        self.cfg = config
        s = setup_step(config, "sft", SFTCollator, load_causal_lm)
        self.dist, self.sp, self.dp, self.run = s.dist, s.sp, s.dp, s.run
        self.tokenizer, self.data, self.collate, self.schedule = s.tokenizer, s.data, s.collate, s.schedule
        self.engine, self.metrics, self.guard = s.engine, s.metrics, s.guard
        self.global_batch_size, self.total_steps = s.global_batch_size, s.total_steps
        self.step = 0

    def fit(self) -> dict:
        run_step_loop(self, "sft", "rows")
        final = self.evaluate()
        finish_step(self, final)
        return final

    def _loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss_sum, n_tokens, logits) of a (B, T) batch on this rank: of its sequence shard under SP."""
        from chatforge.data import model_inputs

        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        if self.sp.enabled:
            local = shard_batch(batch, self.sp)
            logits = self.engine(**sp_model_inputs(local)).logits
            return (*sharded_sft_loss(logits, local["shift_labels"]), logits)
        logits = self.engine(**model_inputs(batch)).logits
        return (*sft_loss(logits, batch["labels"]), logits)

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
            loss_sum, _, logits = self._loss_sum(batch)
            skip = self.guard.should_skip(loss_sum, self.step + 1)
            if skip:
                # A zero loss still runs backward, so ZeRO's gradient hooks stay in step on all ranks.
                loss_sum = 0.0 * logits.nan_to_num(0.0, 0.0, 0.0).mean()
            with zeroed_gradients(self.engine.module) if skip else contextlib.nullcontext():
                self.engine.backward(loss_sum * scale)
            self.engine.step()
            total += loss_sum.detach().float().cpu()
        return {"loss": (all_reduce_sum(total) / n_tokens.clamp(min=1)).item()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean loss and perplexity on the held-out split (every row once over all ranks)."""
        self.engine.eval()
        sums = torch.zeros(2)
        mb, n_eval = self.cfg.train.micro_batch_size, len(self.data.eval)
        for idx in eval_batches(n_eval, mb, self.dp.rank, self.dp.world_size):
            loss_sum, n, _ = self._loss_sum(self.collate([self.data.eval[j] for j in idx]))
            sums += torch.tensor([float(loss_sum), float(n)])
        dummy = torch.full((1, 1), self.tokenizer.pad_token_id)
        dummy_batch = {"input_ids": dummy, "attention_mask": torch.ones_like(dummy), "labels": dummy}
        pad_collective_forwards(
            self.cfg.engine.zero_stage, self.dp, n_eval, mb, lambda: self._loss_sum(dummy_batch)
        )
        sums = all_reduce_sum(sums)
        self.engine.train()
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums[1].item()}
        self.metrics.log("eval", self.step, result)
        return result
