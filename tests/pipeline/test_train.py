"""`chatforge train` end to end: killed during step 3, rerun with the same command, it finishes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = [
    "--deployment-type", "cpu", "--reward-model", "sft", "--data-split", "2,4,4",
    "sft.train.max_steps=3", "sft.batch.micro_batch_size=8",
    "reward.train.max_steps=3", "reward.batch.micro_batch_size=8",
    "ppo.train.max_steps=12", "ppo.train.save_every=1", "ppo.rollout.batch_size=4",
    "ppo.eval.prompts=4", "ppo.rollout.max_new_tokens=6", "ppo.train.report_to=[none]",
]  # fmt: skip


def _command(model: Path, data: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "chatforge.cli", "train", "--actor-model", str(model), "--data", str(data),
        "--output-dir", str(out), *TINY,
    ]  # fmt: skip


def _wait_for_ppo_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 400) -> None:
    """Until a checkpoint after iteration 1 is committed (the one of iteration 0, before any training, would
    make the rerun redo every iteration, and the test could not tell a resume from a restart)."""
    latest = out / "runs" / "ppo" / "checkpoints" / "actor" / "latest"  # the commit point of a PPO checkpoint
    deadline = time.time() + timeout
    while not (latest.is_file() and latest.read_text().strip() not in ("step0", "step1")):
        assert proc.poll() is None, f"train ended (code {proc.returncode}) before step 3 checkpointed"
        assert time.time() < deadline, "no step-3 checkpoint in time"
        time.sleep(0.5)


def _ppo_train_steps(out: Path) -> list[int]:
    lines = (out / "runs" / "ppo" / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["phase"] == "train"]


@pytest.mark.slow
def test_train_killed_in_step3_resumes_and_finishes(fixture_dir, tmp_path):
    from chatforge.fixtures import task_rows

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(300, seed=0, max_operand=4)))
    out = tmp_path / "run"
    cmd = _command(fixture_dir / "llama", data, out, tmp_path / "cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_ppo_checkpoint(first, out)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the whole group: the orchestrator and the step-3 process
        first.wait()
    assert not (out / "runs" / "ppo" / "DONE").exists()
    steps_before = _ppo_train_steps(out)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "step 1 (sft): already finished from the same inputs" in second.stdout
    assert "step 2 (reward): already finished from the same inputs" in second.stdout
    steps_after = _ppo_train_steps(out)
    # Resumed, not restarted: iterations continue after the last checkpoint and end at max_steps.
    assert steps_after[-1] == 12 and steps_after[: len(steps_before)] == steps_before
    assert len(steps_after) < len(steps_before) + 12

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for name in ("actor-sft", "actor-rlhf", "actor-rlhf-ema"):
        AutoModelForCausalLM.from_pretrained(out / name)
    AutoModelForSequenceClassification.from_pretrained(out / "reward")
    # The reward dir keeps the actor's generation config: it says where replies end (and are scored).
    assert (out / "reward" / "generation_config.json").is_file()
    assert (out / "report.html").is_file()
