"""Deterministic step splits and weighted blending, as index arrays (no data is touched here).

Each dataset of n rows is permuted once with `seed`; the permutation is cut by the `data_split`
ratios into disjoint parts for steps 1 (sft), 2 (reward) and 3 (ppo), so the same seed and ratios
give the same rows to each step in every run and every process. Each part's last
round(eval_fraction * len(part)) rows are held out for evaluation.
"""

from __future__ import annotations

import numpy as np

SPLIT_STEPS = ("sft", "reward", "ppo")
STEPS = (*SPLIT_STEPS, "ptx")


def split_bounds(n: int, ratios: list[float]) -> list[int]:
    """Cut points of n rows by ratios: [0, b1, b2, n], e.g. n=100, ratios 2,4,4 -> [0, 20, 60, 100]."""
    total = float(sum(ratios))
    cum = np.cumsum([0.0, *ratios]) / total
    return [int(round(c * n)) for c in cum]


def serves(role: str, step: str) -> bool:
    """Whether a dataset with `role` ('all', 'sft' or 'prompts') gives any rows to `step` (ptx: always)."""
    return step == "ptx" or role == "all" or {"sft": "sft", "prompts": "ppo"}[role] == step


def step_part(n: int, ratios: list[float], role: str, step: str, seed: int) -> np.ndarray:
    """Row indices (into the source, 0-based) that `step` may use; (k,) int64. SFT-only and prompts-only
    datasets give all their rows to their step; ptx (plain text) takes every row."""
    perm = np.random.default_rng(seed).permutation(n)
    if not serves(role, step):
        return perm[:0]
    if step == "ptx" or role != "all":
        return perm
    bounds = split_bounds(n, ratios)
    k = SPLIT_STEPS.index(step)
    return perm[bounds[k] : bounds[k + 1]]


def train_eval(part: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a step part into (train, eval); eval = the last round(eval_fraction * len) rows."""
    n_eval = int(round(len(part) * eval_fraction))
    return part[: len(part) - n_eval], part[len(part) - n_eval :]


def weighted_indices(n: int, weight: float, seed: int) -> np.ndarray:
    """Indices into range(n) sampled by `weight`: floor(weight) full copies plus a seeded subset of
    round(frac(weight) * n) rows, e.g. n=10, weight=2.5 -> 25 indices, each row at least twice."""
    copies = int(weight)
    extra = int(round((weight - copies) * n))
    chosen = np.random.default_rng(seed).permutation(n)[:extra]
    return np.concatenate([np.arange(n)] * copies + [np.sort(chosen)]).astype(np.int64)
