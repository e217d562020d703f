"""Synthetic run dirs in the layout the trainers write: metrics.jsonl (with a torn last line, as
after a crash mid-write), config.yaml, a PPO run's samples.jsonl and over-optimisation warning, and a
pipeline-level demo_summary.json."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

# Panels each step's synthetic metrics should produce, in report order.
SFT_PANELS = ["loss", "perplexity", "lr", "grad_norm"]  # constant tokens per step: no panel
REWARD_PANELS = ["loss", "accuracy", "scores"]  # a constant lr: no panel
PPO_PANELS = [
    "reward",
    "gold",
    "kl",
    "diversity",
    "ref_drift",
    "response_length",
    "entropy",
    "policy_loss",
    "value_loss",
    "clip_frac",
    "logprob_mismatch",
    "time_split",
]


def write_run(root: Path, records: list[dict], config: str = "seed: 1\n", torn: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    if torn:
        lines.append('{"phase": "train", "step": 99999, "lo')  # the crash cut this line
    (root / "metrics.jsonl").write_text("\n".join(lines))
    (root / "config.yaml").write_text(config)
    return root


def sft_records(steps: int = 60) -> list[dict]:
    rng = random.Random(0)
    out = []
    for s in range(1, steps + 1):
        loss = 3.0 * math.exp(-s / 30) + 0.5 + rng.uniform(-0.2, 0.2)
        out.append(
            {
                "phase": "train",
                "step": s,
                "time": s * 0.5,
                "loss": loss,
                "lr": 1e-4 * min(1, s / 10),
                "grad_norm": 1 + rng.random(),
                "tokens": 512.0,
            }
        )
        if s % 20 == 0:
            out.append(
                {"phase": "eval", "step": s, "time": s * 0.5, "loss": loss, "perplexity": math.exp(loss)}
            )
    return out


def reward_records(steps: int = 30) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        out.append(
            {
                "phase": "train",
                "step": s,
                "time": s * 1.0,
                "loss": 0.7 - s / 100,
                "accuracy": 0.5 + s / 100,
                "lr": 5e-5,
            }
        )
        if s % 10 == 0:
            m = s / 30
            out.append(
                {
                    "phase": "eval",
                    "step": s,
                    "time": s * 1.0,
                    "loss": 0.6,
                    "accuracy": 0.6 + m / 5,
                    "chosen_mean": m,
                    "rejected_mean": -m,
                    "margin": 2 * m,
                }
            )
    return out


def ppo_records(iters: int = 12) -> list[dict]:
    """PPO iterations with no ptx_loss logged (PTX off), so that curve must be absent."""
    out = []
    for s in range(1, iters + 1):
        out.append(
            {
                "phase": "train",
                "step": s,
                "time": s * 10.0,
                "reward": s / 10,
                "kl": 0.01 * s,
                "kl_coef": 0.1,  # fixed: its panel is left out
                "entropy": 2.0 - s / 20,
                "response_length": 20.0 + s,
                "clip_frac": 0.05 + 0.001 * s,
                "value_loss": 0.3 / s,
                "policy_loss": -0.01 * s,
                "logprob_mismatch": 1e-3 * (1 + s % 2),
                "time_generation": 6.0,
                "time_scoring": 1.0,
                "time_training": 3.0,
            }
        )
    for step, gold in ((0, 0.5), (iters // 2, 0.55), (iters, 0.4)):
        out.append({
            "phase": "eval", "step": step, "time": step * 10.0, "reward_sampled": 1.5 * step / iters,
            "gold:task:is_correct_sampled": gold, "distinct_2_sampled": 0.9 - 0.02 * step,
            "identical_share_greedy": 0.01 * step, "kl_sampled": 0.1 * step,
        })  # fmt: skip
        if step:
            out[-1]["warnings"] = float(gold < 0.5)  # the reward rose while the gold signal fell
            out[-1]["ref_drift"] = 0.05 * step - 0.4  # -0.1 at step 6, 0.2 at step 12
    return out


# Held-out prompts and the greedy responses at evaluation steps 0 (SFT), 6 and 12: (response, reward, gold).
SAMPLE_PROMPTS = ("What is 3 + 4?", "What is 2 * 2?", "What is 3 + 4?")  # a repeated prompt pairs one to one
SAMPLE_RESPONSES = {
    0: (("7", 0.2, 1.0), ("5", -0.1, 0.0), ("8", 0.0, 0.0)),
    6: (("7", 0.6, 1.0), ("4", 0.5, 1.0), ("7", 0.6, 1.0)),
    12: (("7 7 7 7 7 7 7 7 7 7 7 7", 1.9, 0.0), ("4, and <b>bold</b> claims", 1.2, 1.0), ("7", 0.9, 1.0)),
}


def ppo_samples() -> list[dict]:
    """samples.jsonl as PPO writes it: one block per evaluation, prompts in the same order each time."""
    return [
        {"step": step, "prompt": prompt, "response": text, "reward": reward, "gold:task:is_correct": gold}
        for step, rows in SAMPLE_RESPONSES.items()
        for prompt, (text, reward, gold) in zip(SAMPLE_PROMPTS, rows)
    ]


def write_samples(root: Path, records: list[dict]) -> None:
    lines = [json.dumps(r) for r in records] + ['{"step": 12, "prompt": "What is']  # torn by a crash
    (root / "samples.jsonl").write_text("\n".join(lines))


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    root = tmp_path / "out"
    write_run(root / "runs" / "sft", sft_records(), config="model:\n  name: tiny-llama\n")
    write_run(root / "runs" / "reward", reward_records())
    write_samples(write_run(root / "runs" / "ppo", ppo_records()), ppo_samples())
    (root / "demo_summary.json").write_text(
        json.dumps({"accuracy_before": 0.1, "accuracy_after": 0.4, "sample": {"prompt": "2+2?"}})
    )
    return root
