"""The rollout batch PPO trains on, grouped by RL meaning. B = batch, P = prompt length, A = response length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(kw_only=True)
class Experience:
    # --- the episode: state (prompt) and actions (response tokens)
    sequences: Tensor  # (B, P + A) left-padded prompt, then the response
    attention_mask: Tensor  # (B, P + A) 1 on real tokens
    response_mask: Tensor  # (B, A) 1 on response tokens up to and including the stop token
    prompt_len: int  # P: the response of every row starts at this column
    # --- what the models said about the actions
    logprobs: Tensor  # (B, A) log pi_old(a|s), training-mode forward of the actor (the PPO "old" policy)
    gen_logprobs: Tensor | None = None  # (B, A) log-probs from the sampler, for the train/inference mismatch
    ref_logprobs: Tensor  # (B, A) log pi_ref(a|s) of the frozen SFT model
    values: Tensor  # (B, A) V(s_t) of the critic
    scores: Tensor  # (B,) reward-model score of each full sequence
    # --- what PPO derived from them
    rewards: Tensor  # (B, A) -beta * KL per token + score at the last token
    advantages: Tensor  # (B, A) GAE advantages (whitened or not, as the trainer chooses)
    returns: Tensor  # (B, A) advantages + values: the critic's regression target

    @property
    def size(self) -> int:
        """B, the number of episodes."""
        return self.sequences.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Experience:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> Experience:
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device))

    def select(self, index: Tensor) -> Experience:
        """The episodes at `index` `(b,)` along B."""
        return self._map(lambda t: t[index.to(t.device)])

    def minibatches(self, n: int, generator: torch.Generator | None = None) -> list[Experience]:
        """Shuffle B with `generator` and split it into n mini-batches (sizes differ by at most 1)."""
        if not 1 <= n <= self.size:
            raise ValueError(f"cannot split {self.size} episodes into {n} mini-batches")
        order = torch.randperm(self.size, generator=generator)
        return [self.select(part) for part in order.tensor_split(n)]
