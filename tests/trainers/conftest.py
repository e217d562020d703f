"""Shared by the SFT and reward-model tests: the arithmetic task file, a `runs` helper that builds a
step's config from `key=value` overrides (the same lists feed in-process runs and the CLI), and an SFT
model trained once per session to initialise the reward model of the accuracy test."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dist_utils import launch

# task_rows(6000, max_operand=4) with data_split 2,4,4: ~1140 SFT rows (60 held out), ~2280 reward
# pairs (120 held out); every chosen answer is right and every rejected one wrong.
TASK_ROWS, TASK_SEED, MAX_OPERAND = 6000, 0, 4
CHATFORGE = str(Path(sys.executable).with_name("chatforge"))

# Settings of the SFT model that initialises the reward model of the accuracy test (slow): perplexity
# ~1.02 and ~99% greedy task accuracy; from the raw fixture the reward model stays near 60%.
SFT_INIT = (
    "model.learning_rate=3e-3",
    "optim.warmup=0.05",
    "batch.micro_batch_size=16",
    "batch.epochs=8",
)


@dataclass(frozen=True)
class Runs:
    """Config overrides and runners for `chatforge sft|reward` on the task data."""

    fixture_dir: Path
    task_data: Path

    def args(self, step: str, out: Path, *extra: str, model: str | Path | None = None) -> list[str]:
        """`key=value` overrides of a small run: fp32, short sequences, no tracker."""
        default = self.fixture_dir / ("reward-llama" if step == "reward" else "llama")
        role = "policy" if step == "dpo" else "model"
        return [
            f"{role}.name_or_path={model or default}",
            f"data.datasets={self.task_data}",
            "data.max_prompt_length=64",
            "data.max_length=96",
            "engine.precision=fp32",
            f"train.output_dir={out}",
            "train.report_to=[none]",
            *extra,
        ]

    @staticmethod
    def trainer(step: str, args: list[str]):
        """The step's trainer in this process (one rank, no launcher)."""
        from chatforge.config import DPOConfig, RewardConfig, SFTConfig, load_config
        from chatforge.trainers.dpo import DPOTrainer
        from chatforge.trainers.reward import RewardTrainer
        from chatforge.trainers.sft import SFTTrainer

        config, trainer = {
            "sft": (SFTConfig, SFTTrainer), "reward": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer)
        }[step]  # fmt: skip
        return trainer(load_config(config, None, args))

    def fit(self, step: str, args: list[str]):
        """Train in this process; returns (trainer, final eval)."""
        trainer = self.trainer(step, args)
        return trainer, trainer.fit()

    @staticmethod
    def cli(step: str, args: list[str], nproc: int = 1, env: dict | None = None):
        """`chatforge STEP args` in fresh processes: torchrun for nproc > 1, plain python otherwise."""
        return launch(
            [CHATFORGE, step, *args], nproc=nproc, launcher="torchrun" if nproc > 1 else "none", env=env
        )

    @staticmethod
    def train_records(run_dir: Path) -> dict[int, dict]:
        """step -> the last train record of that step (a resumed run logs its redone steps again)."""
        from chatforge.trainers.run_dir import read_metrics

        return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "train"}

    @staticmethod
    def nan_on_steps(trainer, bad_steps: set[int]) -> None:
        """Make the activations of the final norm NaN in the training forwards of `bad_steps` (one
        micro-batch per step), as an overflow would: the loss and every gradient behind it go NaN."""
        import torch

        calls = [0]

        def hook(module, inputs, output):
            if torch.is_grad_enabled():  # training forwards only, not eval
                calls[0] += 1
                if calls[0] in bad_steps:
                    return output * float("nan")
            return output

        trainer.engine.module.model.norm.register_forward_hook(hook)

    @staticmethod
    def eval_records(run_dir: Path) -> list[dict]:
        from chatforge.trainers.run_dir import read_metrics

        return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "eval"]


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    from chatforge.fixtures import task_rows

    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    rows = task_rows(TASK_ROWS, seed=TASK_SEED, max_operand=MAX_OPERAND)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def runs(fixture_dir, task_data, tmp_path_factory) -> Runs:
    return Runs(fixture_dir, task_data)


@pytest.fixture(scope="session")
def trained_sft(runs, tmp_path_factory) -> tuple[Path, dict]:
    """(run dir, final eval) of an SFT run long enough to solve the task (~25 s alone on 2 cores)."""
    out = tmp_path_factory.mktemp("sft-trained")
    _, final = runs.fit("sft", runs.args("sft", out, *SFT_INIT))
    return out, final


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, str]:
    from chatforge.fixtures import task_rows

    root = tmp_path_factory.mktemp("ppo-data")
    rows = task_rows(200, seed=3)
    prompts = root / "task.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["response"]}) + "\n" for r in rows))
    return {"prompts": str(prompts), "text": str(text)}
