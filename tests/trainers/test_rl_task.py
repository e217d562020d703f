"""End to end on the arithmetic fixture task: after SFT, every way to step 3 raises the task accuracy of the
sampled policy (the policy RL optimises) on held-out prompts over the SFT model: PPO with the step-2 reward
model, GRPO and RLOO with the task's rule reward and no reward model, and DPO on the preference pairs.

Budget as in `chatforge demo` (operands 0..4): the SFT model answers ~88% right greedily but only ~50%
when sampling at temperature 1; the reward model, started from it, ranks right above wrong answers.
"""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.config import PPOConfig, RewardConfig, SFTConfig, from_dict
from chatforge.trainers.run_dir import read_metrics


@pytest.fixture(scope="module")
def sft_and_reward(fixture_dir, tmp_path_factory):
    from chatforge.fixtures import task_rows
    from chatforge.trainers.reward import RewardTrainer
    from chatforge.trainers.sft import SFTTrainer

    root = tmp_path_factory.mktemp("task")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(6000, seed=0, max_operand=4)))
    shared = {"datasets": [str(data)]}
    sft = from_dict(SFTConfig, {
        "model": {"name_or_path": str(fixture_dir / "llama"), "learning_rate": 3e-3}, "data": shared,
        "optim": {"warmup": 0.05}, "batch": {"micro_batch_size": 16, "epochs": 5},
        "train": {"output_dir": str(root / "sft"), "report_to": ["none"]},
    })  # fmt: skip
    SFTTrainer(sft).fit()
    rm = from_dict(RewardConfig, {
        "model": {"name_or_path": str(root / "sft" / "model"), "learning_rate": 1e-3}, "data": shared,
        "batch": {"micro_batch_size": 16, "epochs": 4}, "train": {"output_dir": str(root / "rm"), "report_to": ["none"]},
    })  # fmt: skip
    RewardTrainer(rm).fit()
    return root, shared


def sampled_accuracy(trainer, rows: list[dict], samples: int = 2) -> float:
    """Share of right answers when sampling at temperature 1 with a fixed seed (`samples` per prompt)."""
    from chatforge.data import PromptCollator
    from chatforge.fixtures import is_correct

    collate, tok, right = PromptCollator(trainer.tokenizer), trainer.tokenizer, 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(samples):
        for i in range(0, len(rows), 64):
            batch = collate(rows[i : i + 64])
            out = trainer.rollout(batch, trainer._rollout_config(), generator=generator)
            prompts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
            replies = tok.batch_decode(
                out.sequences[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            right += sum(is_correct(p, r) for p, r in zip(prompts, replies))
    return right / len(rows) / samples


def model_sampled_accuracy(model_dir, rows: list[dict], samples: int = 2) -> float:
    """The same for an exported model dir, through ChatModel (plain transformers, no DeepSpeed)."""
    from chatforge.fixtures import is_correct
    from chatforge.inference import ChatModel

    chat = ChatModel(str(model_dir))
    convs = [json.loads(r["prompt_messages"]) for r in rows]
    right = 0
    for seed in range(samples):
        replies = chat.complete_batch(convs, max_new_tokens=12, temperature=1.0, seed=seed)
        right += sum(is_correct(c[-1]["content"], r.text) for c, r in zip(convs, replies))
    return right / len(rows) / samples


def run_rule_rl(root, shared, algorithm: str, held_out: list[dict]) -> tuple[float, float]:
    """(sampled accuracy before, after) of a critic-free run on the rule reward (no reward model)."""
    from chatforge.trainers.ppo import build_trainer

    cfg = from_dict(PPOConfig, {
        "actor": {"name_or_path": str(root / "sft" / "model"), "learning_rate": 3e-4},
        "reward": {"functions": ["chatforge.fixtures.task:is_correct"]},
        "algorithm": {"name": algorithm}, "data": shared,
        "rollout": {"max_new_tokens": 12, "batch_size": 8, "n_samples_per_prompt": 4},
        "eval": {"prompts": 64, "samples": 2},
        "train": {"output_dir": str(root / algorithm), "max_steps": 80, "eval_every": 20, "report_to": ["none"]},
    })  # fmt: skip
    trainer = build_trainer(cfg)
    assert trainer.engine.critic is None and not trainer.engine.reward_models
    before = model_sampled_accuracy(root / "sft" / "model", held_out, samples=4)
    trainer.fit()
    return before, model_sampled_accuracy(root / algorithm / "actor", held_out, samples=4)


def rollout_reward_windows(run_dir, n: int = 20) -> tuple[float, float]:
    """Mean rollout reward of a run's first and last `n` iterations."""
    train = [r["reward"] for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "train"]
    return sum(train[:n]) / n, sum(train[-n:]) / n


def held_out_prompts(shared, tokenizer) -> list[dict]:
    from chatforge.data import load_step_data

    return list(load_step_data(from_dict(PPOConfig, {"data": shared}).data, tokenizer, "ppo").eval)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_rl_on_the_rule_reward_raises_held_out_accuracy(sft_and_reward, algorithm):
    from transformers import AutoTokenizer

    root, shared = sft_and_reward
    held_out = held_out_prompts(shared, AutoTokenizer.from_pretrained(root / "sft" / "model"))
    before, after = run_rule_rl(root, shared, algorithm, held_out)
    first, last = rollout_reward_windows(root / algorithm)
    print(
        f"{algorithm}: sampled accuracy {before:.3f} -> {after:.3f}; rollout accuracy {first:.3f} -> {last:.3f}"
    )
    # 640 rollouts per window (std of a window's mean ~0.02); runs measured +0.11..+0.18 at 80 iterations.
    assert last > first + 0.07
    # Held-out, same sampling seeds before and after: RLOO's unscaled advantages learn slower than GRPO's
    # (measured +0.05..+0.21), so only "better than SFT" is asserted here.
    assert after > before


@pytest.mark.slow
def test_dpo_on_the_preference_pairs_raises_held_out_accuracy(sft_and_reward):
    from transformers import AutoTokenizer

    from chatforge.config import DPOConfig
    from chatforge.trainers.dpo import DPOTrainer

    root, shared = sft_and_reward
    held_out = held_out_prompts(shared, AutoTokenizer.from_pretrained(root / "sft" / "model"))
    cfg = from_dict(DPOConfig, {
        "policy": {"name_or_path": str(root / "sft" / "model"), "learning_rate": 5e-4}, "data": shared,
        "dpo": {"sft_coef": 1.0},  # RPO: without it DPO lowers the chosen replies too (+2-4 points only here)
        "batch": {"micro_batch_size": 16, "epochs": 2}, "train": {"output_dir": str(root / "dpo"), "report_to": ["none"]},
    })  # fmt: skip
    final = DPOTrainer(cfg).fit()
    before = model_sampled_accuracy(root / "sft" / "model", held_out, samples=4)
    after = model_sampled_accuracy(root / "dpo" / "model", held_out, samples=4)
    print(f"dpo: reward accuracy {final['accuracy']:.3f}, sampled accuracy {before:.3f} -> {after:.3f}")
    assert final["accuracy"] > 0.85 and final["margin"] > 0
    assert after > before + 0.05


@pytest.mark.slow
def test_ppo_raises_reward_and_task_accuracy_over_sft(sft_and_reward):
    from chatforge.data import load_step_data
    from chatforge.trainers.ppo import PPOTrainer, RLHFEngine

    root, shared = sft_and_reward
    cfg = from_dict(PPOConfig, {
        "actor": {"name_or_path": str(root / "sft" / "model"), "learning_rate": 3e-4},
        "critic": {"learning_rate": 5e-4},
        "reward": {"models": [str(root / "rm" / "model")]},
        "data": shared,
        "rollout": {"max_new_tokens": 12, "batch_size": 32},
        "algorithm": {"kl_coef": 0.02, "lam": 1.0, "num_minibatches": 2, "epochs": 4},
        "eval": {"prompts": 64, "gold": ["chatforge.fixtures.task:is_correct"]},
        "train": {"output_dir": str(root / "ppo"), "max_steps": 120, "eval_every": 20, "report_to": ["none"]},
    })  # fmt: skip
    trainer = PPOTrainer(RLHFEngine(cfg), cfg)
    held_out = list(load_step_data(cfg.data, trainer.tokenizer, "ppo").eval)
    before = sampled_accuracy(trainer, held_out)
    trainer.fit()
    after = sampled_accuracy(trainer, held_out)
    first, last = rollout_reward_windows(root / "ppo")
    print(f"sampled accuracy {before:.3f} -> {after:.3f}; rollout reward {first:.2f} -> {last:.2f}")
    # Reward-model scores of fresh rollouts, normalised by step 2's score std (a right and a wrong answer to
    # one question differ by about 1.4): a fifth of the answers turning right is about +0.28.
    assert last > first + 0.25
    assert after > before + 0.1  # held-out prompts, same seed: the sampled policy answers right more often
