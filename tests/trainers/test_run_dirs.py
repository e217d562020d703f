"""What the offline steps write, and what they refuse to overwrite: each command's own default run dir, no
fresh run over a finished one, evaluations over zero held-out rows reported as empty, and a full disk named
with the checkpoint that is kept. In-process, on the tiny Llama and the arithmetic task."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from chatforge.trainers.run_dir import RunDirError

STEPS = ("batch.micro_batch_size=8", "train.max_steps=2")


def _without_output_dir(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("train.output_dir=")]


def test_sft_then_reward_with_the_default_dirs_keep_both_models(runs, tmp_path, monkeypatch):
    from chatforge.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig

    assert [c().train.output_dir for c in (SFTConfig, RewardConfig, DPOConfig, PPOConfig)] == [
        "runs/sft", "runs/reward", "runs/dpo", "runs/ppo",
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    runs.fit("sft", _without_output_dir(runs.args("sft", tmp_path, *STEPS)))
    sft_weights = (tmp_path / "runs/sft/model/model.safetensors").read_bytes()
    runs.fit("reward", _without_output_dir(runs.args("reward", tmp_path, *STEPS)))
    assert (tmp_path / "runs/sft/model/model.safetensors").read_bytes() == sft_weights
    assert (tmp_path / "runs/reward/model/reward_stats.json").is_file()
    assert [(tmp_path / f"runs/{s}/STEP").read_text().strip() for s in ("sft", "reward")] == ["sft", "reward"]


def test_a_fresh_run_refuses_a_finished_run_dir_and_resume_takes_it(runs, tmp_path):
    out = tmp_path / "sft"
    runs.fit("sft", runs.args("sft", out, *STEPS))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=r"holds a finished 'sft' run. Fix: continue it with --resume"):
        runs.trainer("sft", runs.args("sft", out, *STEPS))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(RunDirError, match="holds a 'sft' run; a 'reward' run cannot write there"):
        runs.trainer("reward", runs.args("reward", out, *STEPS))
    runs.fit("sft", runs.args("sft", out, *STEPS, "train.resume=true"))  # continuing it is fine


@pytest.mark.parametrize(
    ("step", "empty"), [("sft", {"tokens": 0.0}), ("reward", {"pairs": 0.0}), ("dpo", {"pairs": 0.0})]
)
def test_an_evaluation_over_zero_rows_is_reported_as_empty(runs, tmp_path, step, empty):
    from chatforge.report import build_report

    out = tmp_path / step
    _, final = runs.fit(step, runs.args(step, out, *STEPS, "data.eval_fraction=0"))
    assert final == empty  # not loss 0.0 / perplexity 1.0 / accuracy 0
    evals = runs.eval_records(out)
    assert [r["step"] for r in evals] == [0, 2]
    assert all(set(r) == {"phase", "step", "time", *empty} for r in evals)
    assert json.loads((out / "DONE").read_text())["step"] == 2
    if step == "reward":  # no score statistics from zero pairs: step 3 uses raw scores
        assert not (out / "model" / "reward_stats.json").exists()
    assert build_report(out).is_file()


def test_ppo_evaluates_on_training_prompts_when_none_are_held_out():
    from types import SimpleNamespace

    from chatforge.trainers.ppo import eval_rows

    data = SimpleNamespace(train=[{"i": i} for i in range(10)], eval=[])
    assert eval_rows(data, 4, rank=1, world=2) == [{"i": 1}, {"i": 3}]
    data.eval = [{"i": 100 + i} for i in range(3)]
    assert eval_rows(data, 4, rank=0, world=2) == [{"i": 100}]


def test_a_full_disk_names_the_dir_and_keeps_the_last_complete_checkpoint(runs, tmp_path, monkeypatch):
    from chatforge.cli import describe_error
    from chatforge.trainers.checkpoint import DiskFullError

    out = tmp_path / "sft"
    trainer = runs.trainer("sft", runs.args("sft", out, "batch.micro_batch_size=8", "train.max_steps=6",
                                            "train.save_every=2"))  # fmt: skip
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the disk fills up while checkpoint step4 is written
        if "step4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError) as info:
        trainer.fit()
    assert str(info.value) == (
        f"no space left on {out} while writing checkpoint step4; the last complete checkpoint (step2, in "
        f"{out / 'checkpoints'}) is kept"
    )
    assert (out / "checkpoints" / "model" / "latest").read_text().strip() == "step2"
    assert not list((out / "checkpoints").glob("*/step4"))  # the partial checkpoint gave its space back
    code, line = describe_error(info.value, "sft")
    assert code == 1 and line.endswith(
        "kept. Fix: free space, then rerun with --resume to continue from the last checkpoint"
    )
    monkeypatch.setattr(torch, "save", real_save)
    _, final = runs.fit("sft", runs.args("sft", out, "batch.micro_batch_size=8", "train.max_steps=6",
                                         "train.save_every=2", "train.resume=true"))  # fmt: skip
    assert sorted(runs.train_records(out)) == [1, 2, 3, 4, 5, 6] and "loss" in final


def test_torch_save_on_a_full_disk_counts_as_full(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... file write failed') without an errno."""
    import shutil
    from collections import namedtuple

    from chatforge.trainers.checkpoint import is_disk_full

    usage = namedtuple("usage", "total used free")
    error = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")  # fmt: skip
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 0))
    assert is_disk_full(error, tmp_path / "run")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 5 << 30, 5 << 30))
    assert not is_disk_full(error, tmp_path / "run")  # a write failure with space left is something else
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
