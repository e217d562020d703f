"""End to end on the arithmetic fixture task: SFT -> reward model -> PPO raises the reward-model score.

The tiny reward model only partly separates right from off-by-one answers, so the test asserts what PPO
optimises (the RM score, on fresh samples and on greedy held-out responses) and bounds task accuracy
against collapse; both accuracies are printed.
"""

from __future__ import annotations

import json

import pytest

from chatforge.config import PPOConfig, RewardConfig, SFTConfig, from_dict
from chatforge.trainers.common import read_metrics


@pytest.fixture(scope="module")
def sft_and_reward(fixture_dir, tmp_path_factory):
    from chatforge.fixtures import task_rows
    from chatforge.trainers.reward import RewardTrainer
    from chatforge.trainers.sft import SFTTrainer

    root = tmp_path_factory.mktemp("task")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(1200, seed=11)))
    cache = str(root / "cache")
    sft = from_dict(SFTConfig, {
        "model": {"name_or_path": str(fixture_dir / "llama")},
        "data": {"datasets": [str(data)], "data_split": [1, 0, 0], "cache_dir": cache},
        "optim": {"learning_rate": 3e-3, "warmup_ratio": 0.05},
        "train": {"output_dir": str(root / "sft"), "micro_batch_size": 16, "epochs": 3, "tensorboard": False},
    })  # fmt: skip
    SFTTrainer(sft).fit()
    rm = from_dict(RewardConfig, {
        "model": {"name_or_path": str(fixture_dir / "reward-llama")},
        "data": {"datasets": [str(data)], "data_split": [0, 1, 0], "cache_dir": cache},
        "optim": {"learning_rate": 1e-3},
        "train": {"output_dir": str(root / "rm"), "micro_batch_size": 16, "epochs": 3, "tensorboard": False},
    })  # fmt: skip
    RewardTrainer(rm).fit()
    return root, data, cache


@pytest.mark.slow
def test_ppo_raises_reward_model_score_on_the_task(sft_and_reward):
    from chatforge.fixtures import is_correct
    from chatforge.trainers.ppo import PPOTrainer
    from chatforge.trainers.rlhf_engine import RLHFEngine

    root, data, cache = sft_and_reward
    cfg = from_dict(PPOConfig, {
        "actor": {"name_or_path": str(root / "sft" / "model")},
        "reward": {"name_or_path": str(root / "rm" / "model")},
        "data": {"datasets": [str(data)], "data_split": [0, 0, 1], "cache_dir": cache},
        "generation": {"max_new_tokens": 12},
        "actor_optim": {"learning_rate": 5e-4},
        "critic_optim": {"learning_rate": 1e-3},
        "ppo": {"kl_coef": 0.05, "num_minibatches": 2, "ppo_epochs": 2, "missing_eos_penalty": 1.0},
        "train": {"output_dir": str(root / "ppo"), "max_steps": 20, "rollout_batch_size": 32,
                  "eval_prompts": 64, "tensorboard": False},
    })  # fmt: skip
    PPOTrainer(RLHFEngine(cfg), cfg, task_check=is_correct).fit()
    records = read_metrics(root / "ppo" / "metrics.jsonl")
    train = [r["reward_raw"] for r in records if r["phase"] == "train"]
    first_eval, last_eval = [r for r in records if r["phase"] == "eval"]
    print(f"train reward {train[:3]} -> {train[-5:]}; eval {first_eval} -> {last_eval}")
    assert sum(train[-5:]) / 5 > sum(train[:3]) / 3 + 0.05
    assert last_eval["reward_raw"] > first_eval["reward_raw"]
    assert last_eval["task_accuracy"] >= first_eval["task_accuracy"] - 0.1
    assert last_eval["response_length"] < cfg.generation.max_new_tokens  # no length hacking
