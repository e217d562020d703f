"""The reward of step 3: reward models (one, several, or one with several heads), rule functions, or a
weighted sum of both, turned into one score per response. B = batch, H = score heads.

A reward model whose tokenizer differs from the actor's (another family, another chat template) is not fed
the actor's token ids: the conversation is rendered again with the reward model's own template, and scored
at the token step 2 trained it on (the first end-of-turn token of the reply).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .functions import RewardFunction

log = logging.getLogger("chatforge")
REWARD_STATS_FILE = "reward_stats.json"


@dataclass
class Responses:
    """What every reward sees of a batch of B responses."""

    sequences: Tensor  # (B, P + A) the actor's tokens: left-padded prompt, then the response
    attention_mask: Tensor  # (B, P + A)
    prompt_len: int  # P
    finished: Tensor  # (B,) bool: ended with an end-of-turn token or a stop string
    prompts: list[str]  # the last user message before each response
    responses: list[str]  # each response's text, special tokens removed
    messages: list[list[dict]]  # each prompt conversation
    fields: dict[str, list] = field(default_factory=dict)  # the source rows' other columns, as lists


def read_reward_stats(model_dir: str) -> dict | None:
    """{mean: [H], std: [H], count} of step-2 scores saved beside a reward model, or None."""
    path = Path(model_dir) / REWARD_STATS_FILE
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    for key in ("mean", "std"):
        if not isinstance(stats[key], list):
            stats[key] = [stats[key]]
    return stats


class RewardModel:
    """A frozen reward model (a `TrainEngine`) with its tokenizer, step-2 statistics and weight."""

    def __init__(self, engine, tokenizer, actor_tokenizer, weight: float = 1.0, name: str = ""):
        from chatforge.data.pipeline import tokenizer_fingerprint
        from chatforge.data.render import ChatRenderer

        self.engine, self.tokenizer, self.weight, self.name = engine, tokenizer, weight, name
        self.same_tokens = tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(actor_tokenizer)
        self.renderer = None if self.same_tokens else ChatRenderer(tokenizer)
        if not self.same_tokens:
            log.info(
                "reward model %s has its own tokenizer/template: responses are rendered again for it", name
            )
        self.stats = read_reward_stats(name) if name else None

    @torch.no_grad()
    def score(self, r: Responses) -> Tensor:
        """(B, H) scores, normalised per head with the step-2 statistics when they exist."""
        if self.same_tokens:
            scores = self.engine.scores(r.sequences, r.attention_mask)
        else:
            scores = self.engine.scores(*self._render(r))
        scores = scores.float()
        if self.stats is not None:
            mean = torch.tensor(self.stats["mean"], device=scores.device)
            std = torch.tensor(self.stats["std"], device=scores.device).clamp(min=1e-6)
            scores = (scores - mean) / std
        return scores

    def _render(self, r: Responses) -> tuple[Tensor, Tensor]:
        from chatforge.data.collate import right_pad

        rows = []
        for messages, response in zip(r.messages, r.responses):
            reply = [{"role": "assistant", "content": response}]
            rows.append(self.renderer.prompt_ids(messages) + self.renderer.scored_reply_ids(messages, reply))
        ids, mask = right_pad(rows, self.tokenizer.pad_token_id)
        return ids.to(self.engine.device), mask.to(self.engine.device)


class RewardSignal:
    """score = reward-model part + sum of weighted rule rewards, clipped."""

    def __init__(
        self, models: list[RewardModel], functions: list[RewardFunction], conservative: float = 0.0, clip: float = 0.0
    ):  # fmt: skip
        self.models, self.functions = models, functions
        self.conservative, self.clip = conservative, clip

    def __call__(self, r: Responses) -> tuple[Tensor, dict[str, Tensor]]:
        """(B,) total scores and (B,) parts by name (for logging)."""
        device = r.sequences.device
        parts: dict[str, Tensor] = {}
        total = torch.zeros(len(r.responses), device=device)
        if self.models:
            rm, parts = self._model_part(r)
            total = total + rm
        fields = {"messages": r.messages, "finished": r.finished.tolist(), **r.fields}
        for fn in self.functions:
            values = torch.tensor(fn(r.prompts, r.responses, fields), device=device)
            parts[f"fn:{fn.name}"] = values
            total = total + fn.weight * values
        if self.clip:
            total = total.clamp(-self.clip, self.clip)
        return total, parts

    def _model_part(self, r: Responses) -> tuple[Tensor, dict[str, Tensor]]:
        scored = [m.score(r) for m in self.models]  # each (B, H)
        members = torch.cat(scored, dim=1)
        parts = {"rm": members.mean(1)}
        if members.shape[1] > 1:
            parts["rm_std"] = members.std(1)
        if self.conservative:
            # Uncertainty-weighted optimisation (Coste et al. 2023): where the members disagree the policy
            # is off the reward model's data, so the reward is lowered.
            return parts["rm"] - self.conservative * parts.get("rm_std", torch.zeros_like(parts["rm"])), parts
        weighted = sum(m.weight * s.mean(1) for m, s in zip(self.models, scored))
        return weighted, parts
