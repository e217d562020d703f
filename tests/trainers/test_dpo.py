"""DPOTrainer and `chatforge dpo` on the task's preference pairs: the implicit reward learns to rank the
pairs, the reference is frozen (a second model, or the LoRA policy's own base), exports load in plain
transformers, a killed run resumes exactly, and the pipeline's mode=dpo wires SFT into DPO."""

from __future__ import annotations

import pytest
import torch

FAST = ("policy.learning_rate=1e-3", "batch.micro_batch_size=16", "train.max_steps=6")


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_learns_to_rank_the_pairs_and_exports(runs, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    trainer, final = runs.fit(
        "dpo", runs.args("dpo", out, *FAST, f"policy.lora_r={lora}", "train.eval_every=3")
    )
    assert (trainer.ref is None) == bool(lora)  # LoRA: the reference is the policy with adapters disabled
    evals = runs.eval_records(out)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert evals[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # -log sigmoid(0)
    assert final["margin"] > evals[0]["margin"] and final["loss"] < evals[0]["loss"]
    assert final["reward_chosen"] > final["reward_rejected"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.arange(10, 20)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_dpo_resume_after_a_kill_equals_the_unbroken_run(runs, tmp_path):
    steps = (*FAST, "train.save_every=2")
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match=r"failed \(17\)"):
        runs.cli("dpo", runs.args("dpo", killed, *steps), env={"CHATFORGE_FAULT_AT_STEP": "3"})
    runs.cli("dpo", [*runs.args("dpo", killed, *steps), "--resume"])
    whole = tmp_path / "whole"
    runs.fit("dpo", runs.args("dpo", whole, *steps))
    got, want = runs.train_records(killed), runs.train_records(whole)
    for step in (3, 4, 5, 6):
        keys = [k for k in want[step] if k not in ("phase", "time")]
        assert {k: got[step][k] for k in keys} == pytest.approx({k: want[step][k] for k in keys}, rel=1e-6), (
            step
        )


@pytest.mark.slow
def test_pipeline_mode_dpo_runs_sft_then_dpo(fixture_dir, runs, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pipe"
    cmd = [
        sys.executable, "-m", "chatforge", "train", "--actor-model", str(fixture_dir / "llama"),
        "--data", str(runs.task_data), "--deployment-type", "cpu", "--mode", "dpo", "--output-dir", str(out),
        "sft.train.max_steps=3", "dpo.train.max_steps=3", "sft.batch.micro_batch_size=8",
        "dpo.batch.micro_batch_size=8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "actor-sft" / "config.json").is_file() and (out / "actor-dpo" / "config.json").is_file()
    assert not (out / "reward").exists() and (out / "runs" / "dpo" / "DONE").is_file()
