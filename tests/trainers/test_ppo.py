"""PPOTrainer on untrained fixture models in one process: the invariants of the first PPO step, read from
the trainer's own stats, and the loop's outputs (metrics, exports, EMA, PTX, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.config import PPOConfig, from_dict
from chatforge.trainers.common import read_metrics

TRAIN_METRICS = (
    "reward_raw", "reward_norm", "kl", "kl_coef", "entropy", "response_length", "clip_frac", "value_loss",
    "policy_loss", "ptx_loss", "logprob_mismatch", "time_generation", "time_scoring", "time_training",
)  # fmt: skip


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    from chatforge.fixtures import task_rows

    root = tmp_path_factory.mktemp("ppo-data")
    rows = task_rows(200, seed=3)
    prompts = root / "task.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["response"]}) + "\n" for r in rows))
    return {"prompts": str(prompts), "text": str(text), "cache": str(root / "cache")}


def make_config(fixture_dir: Path, task_files: dict, out: Path, **overrides) -> PPOConfig:
    base = {
        "actor": {"name_or_path": str(fixture_dir / "llama")},
        "reward": {"name_or_path": str(fixture_dir / "reward-llama")},
        "data": {"datasets": [task_files["prompts"]], "data_split": [0, 0, 1], "cache_dir": task_files["cache"]},
        "generation": {"max_new_tokens": 8},
        "ppo": {"num_minibatches": 2, "ppo_epochs": 2},
        "train": {"output_dir": str(out), "max_steps": 2, "rollout_batch_size": 4, "eval_prompts": 4,
                  "tensorboard": False},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[section] = value
    return from_dict(PPOConfig, base)


def trainer_for(cfg: PPOConfig):
    from chatforge.trainers.ppo import PPOTrainer
    from chatforge.trainers.rlhf_engine import RLHFEngine

    return PPOTrainer(RLHFEngine(cfg), cfg)


def prompt_batch(trainer, n: int = 4) -> dict:
    from chatforge.data import PromptCollator, load_step_data

    data = load_step_data(trainer.cfg.data, trainer.tokenizer, "ppo")
    return PromptCollator(trainer.tokenizer)([data.train[i] for i in range(n)])


@pytest.mark.parametrize("lora", [0, 4])
def test_first_minibatch_ratio_is_one_and_kl_is_zero(fixture_dir, task_files, tmp_path, lora):
    """Actor == reference at the start: KL is 0; old log-probs come from the training forward: ratio 1."""
    cfg = make_config(fixture_dir, task_files, tmp_path, actor_engine__lora={"r": lora})
    trainer = trainer_for(cfg)
    assert trainer.engine.shares_reference == bool(lora)
    exp = trainer.generate_experience(prompt_batch(trainer))
    assert exp.response_mask.sum() > 0
    torch.testing.assert_close(exp.ref_logprobs, exp.logprobs, rtol=0, atol=0)
    stats = trainer.train_rlhf(exp)
    assert stats["kl"] == 0.0
    assert stats["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac_first"] == 0.0
    # Sampler and training forward agree up to kernel differences (cached vs full-sequence attention).
    assert stats["logprob_mismatch"] < 1e-4
    # After 4 actor steps the policy moved, so a second rollout has KL > 0 against the reference.
    exp2 = trainer.generate_experience(prompt_batch(trainer))
    assert (exp2.logprobs - exp2.ref_logprobs).abs().max() > 0


def test_rewards_at_last_token_and_masked_after_eos(fixture_dir, task_files, tmp_path):
    cfg = make_config(fixture_dir, task_files, tmp_path, ppo__kl_coef=0.0, ppo__reward_clip=0.0)
    trainer = trainer_for(cfg)
    exp = trainer.generate_experience(prompt_batch(trainer))
    last = exp.response_mask.sum(1) - 1
    for row in range(exp.size):
        nonzero = exp.rewards[row].nonzero().flatten().tolist()
        assert nonzero in ([int(last[row])], [])
        assert exp.rewards[row, int(last[row])] == pytest.approx(float(exp.scores[row]))
    assert (exp.advantages[exp.response_mask == 0] == 0).all()
    assert (exp.returns[exp.response_mask == 0] == 0).all()


def test_fit_logs_every_metric_and_exports_actor_ema(fixture_dir, task_files, tmp_path):
    from chatforge.fixtures import is_correct

    cfg = make_config(
        fixture_dir, task_files, tmp_path / "run",
        ema={"enabled": True, "decay": 0.5},
        ptx={"coef": 0.5, "micro_batch_size": 2,
             "data": {"datasets": [task_files["text"]], "eval_fraction": 0.0, "cache_dir": task_files["cache"]}},
        train__save_every=1,
    )  # fmt: skip
    trainer = trainer_for(cfg)
    trainer.task_check = is_correct
    final = trainer.fit()
    assert "task_accuracy" in final
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for name in TRAIN_METRICS:
        assert all(name in r for r in train), name
    assert all(r["ptx_loss"] > 0 for r in train)
    assert [r["step"] for r in records if r["phase"] == "eval"] == [0, 2]
    for sub in ("actor", "actor-ema"):
        assert (tmp_path / "run" / sub / "model.safetensors").is_file(), sub
    assert (tmp_path / "run" / "DONE").is_file()
