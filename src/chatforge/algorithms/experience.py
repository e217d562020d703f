"""The rollout batch step 3 trains on, grouped by RL meaning. B = responses, P = prompt length, A = response length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

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
    logprobs: Tensor  # (B, A) log pi_old(a|s): the policy that sampled, recomputed by the training forward
    ref_logprobs: Tensor  # (B, A) log pi_ref(a|s) of the frozen SFT model
    values: Tensor | None = None  # (B, A) V(s_t) of the critic (PPO only)
    scores: Tensor  # (B,) the reward of each whole response
    # --- what the estimator derived from them
    rewards: (
        Tensor  # (B, A) per-token rewards: the score at the last token (-beta KL_t when the KL is a reward)
    )
    advantages: Tensor  # (B, A)
    returns: Tensor | None = None  # (B, A) the critic's regression target (PPO only)
    # --- this batch's statistics (rank-local means: reward, kl, lengths, sampler mismatch, ...)
    stats: dict[str, float] = field(default_factory=dict)

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

    def trimmed(self) -> Experience:
        """The same episodes without the columns that are padding in every row: leading prompt pads and
        response positions past every row's end (a mini-batch of short responses then costs its own length,
        not the rollout's longest). Those positions are masked everywhere, so losses are unchanged."""
        real = self.attention_mask[:, : self.prompt_len].sum(0) > 0
        lead = int(real.long().argmax()) if bool(real.any()) else self.prompt_len
        width = int(self.response_mask.sum(1).max()) if self.size else 0
        if lead == 0 and width == self.response_mask.shape[1]:
            return self
        full, response = slice(lead, self.prompt_len + width), slice(0, width)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() == 2:
                changes[f.name] = value[:, full if value.shape[1] == self.sequences.shape[1] else response]
        return replace(self, **changes, prompt_len=self.prompt_len - lead)

    def minibatches(self, n: int, generator: torch.Generator | None = None) -> list[Experience]:
        """Shuffle B with `generator` and split it into n mini-batches (sizes differ by at most 1)."""
        if not 1 <= n <= self.size:
            raise ValueError(f"cannot split {self.size} episodes into {n} mini-batches")
        order = torch.randperm(self.size, generator=generator)
        return [self.select(part) for part in order.tensor_split(n)]
