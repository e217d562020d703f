"""Pieces of the PPO trainer that are not the algorithm: forwards that cut out the response, score
shaping, the PTX stream, rank-averaged statistics, and the two-engine checkpoint.

B = batch, P = prompt length (left padded), A = response length, T = P + A, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from chatforge.config import PPOAlgoConfig
from chatforge.engine import all_reduce_sum, barrier
from chatforge.models.value import position_ids_from_mask, token_values

from .common import BatchSchedule, RunDir, prune_checkpoints, rng_state, set_rng_state


def response_logits(forward, sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """(B, A, V) logits that predict the A response tokens (positions P-1 .. T-2)."""
    out = forward(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits[:, prompt_len - 1 : -1]


def response_values(critic, sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """(B, A) V(s_t): the critic's value of the state before each response token."""
    values = token_values(critic.module, sequences, attention_mask, forward=critic)
    return values[:, prompt_len - 1 : -1]


def shape_scores(raw: Tensor, finished: Tensor, cfg: PPOAlgoConfig, stats: dict | None) -> Tensor:
    """(B,) scores handed to PPO: minus the missing-EOS penalty, then normalised with step-2 statistics.

    Clipping happens later, in `compute_token_rewards` (reward_clip)."""
    scores = raw.float()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(finished, scores, scores - cfg.missing_eos_penalty)
    if cfg.normalize_reward:
        if stats is None:
            raise FileNotFoundError(
                "ppo.normalize_reward needs reward_stats.json beside the reward model (written by step 2)"
            )
        scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    return scores


def rank_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank must call with the same keys)."""
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {k: (total[i] / world).item() for i, k in enumerate(keys)}


class PTXStream:
    """An endless stream of PTX (plain-text LM) micro-batches, resumable by position."""

    def __init__(self, rows, collate, micro: int, rank: int, world: int, seed: int):
        self.rows, self.collate = rows, collate
        self.schedule = BatchSchedule(len(rows), micro, 1, rank, world, seed)
        if self.schedule.steps_per_epoch == 0:
            raise ValueError(f"the PTX data has {len(rows)} rows: too few for one batch on every rank")
        self._windows: Iterator | None = None

    def next(self) -> dict:
        if self._windows is None:
            self._windows = self.schedule.windows()
        (idx,) = next(self._windows)
        return self.collate([self.rows[j] for j in idx])

    @property
    def position(self) -> list[int]:
        return list(self.schedule.position)

    @position.setter
    def position(self, value: list[int]) -> None:
        self.schedule.position = tuple(value)
        self._windows = None


@dataclass
class LoopState:
    """What a resumed run needs besides the engines' own states."""

    step: int
    prompt_position: list[int]
    ptx_position: list[int] | None
    kl_coef: float
    sampler_state: Tensor


def save_ppo_checkpoint(engine, run: RunDir, state: LoopState, keep: int, ema=None) -> None:
    """Actor and critic checkpoints tagged `step<N>`, the loop state and RNGs in the actor's."""
    tag = f"step{state.step}"
    client = {**state.__dict__, "rng": rng_state()}
    if ema is not None:
        client["ema"] = ema.state_dict()
    # The critic goes first: the actor's `latest` pointer is the commit point that resume reads, so a
    # crash between the two saves leaves both engines at the previous, complete checkpoint.
    engine.critic.save_checkpoint(run.checkpoints / "critic", tag=tag)
    engine.actor.save_checkpoint(run.checkpoints / "actor", tag=tag, client_state=client)
    barrier()
    for part in ("actor", "critic"):
        prune_checkpoints(run.checkpoints / part, keep, engine.dist.is_main)


def load_ppo_checkpoint(engine, run: RunDir, ema=None) -> LoopState | None:
    """Restore both engines and the loop state from the latest checkpoint; None when there is none."""
    client = engine.actor.load_checkpoint(run.checkpoints / "actor")
    if client is None:
        return None
    engine.critic.load_checkpoint(run.checkpoints / "critic", tag=f"step{client['step']}")
    set_rng_state(client.pop("rng"))
    if ema is not None and "ema" in client:
        ema.load_state_dict(client.pop("ema"))
    # DeepSpeed returns its own keys in the client state too; keep ours.
    return LoopState(**{f.name: client[f.name] for f in fields(LoopState)})
