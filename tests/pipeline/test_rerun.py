"""`chatforge train` reruns: the same command skips or resumes; other inputs are refused before anything is
touched, also after a crash; --restart-from redoes a step; a later step notices a redone earlier one; a step's
bad input reads as one line, also under torchrun; Ctrl-C exits 130. The records and flag parsing are checked
in-process (fast); the rest runs the real command on step 1 of a tiny Llama."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatforge.config import ConfigError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = ["sft.batch.micro_batch_size=4", "sft.train.report_to=[none]"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **extra}


def _train(model: Path, data: Path, out: Path, *extra: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "chatforge", "train", "--actor-model", str(model), "--data", str(data),
           "--output-dir", str(out), "--deployment-type", "cpu", "--step", "1", *TINY, *extra]  # fmt: skip
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=600)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}  # fmt: skip


def _train_steps(out: Path) -> list[int]:
    lines = (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["phase"] == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from chatforge.fixtures import task_rows

    path = tmp_path_factory.mktemp("rerun-data") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in task_rows(120, seed=0, max_operand=4)))
    return path


# --- in-process: flags, validation and records ------------------------------------------------------------
def test_overrides_after_data_and_step_are_not_swallowed(tmp_path):
    from chatforge.cli import build_parser
    from chatforge.cli.pipeline_cmds import flag_overrides, split_overrides

    odd = tmp_path / "a=b.jsonl"  # an existing file that looks like an override stays a dataset
    odd.write_text("{}\n")
    argv = [
        "train",
        "--data",
        "x.jsonl",
        str(odd),
        "sft.batch.epochs=2",
        "--step",
        "1",
        "2",
        "ppo.eval.prompts=8",
    ]
    args = build_parser().parse_args(argv)
    split_overrides(args)
    assert args.data == ["x.jsonl", str(odd)] and args.step == [1, 2]
    assert args.overrides == ["sft.batch.epochs=2", "ppo.eval.prompts=8"]
    assert 'data.datasets=["x.jsonl", "' + str(odd) + '"]' in flag_overrides(args)


def _pipeline(tmp_path: Path, fixture_dir: Path, data: Path, *extra: str):
    from chatforge.pipeline import load_pipeline_config
    from chatforge.pipeline.run import Layout, step_configs

    base = [
        f"actor_model={fixture_dir / 'llama'}",
        f"data.datasets=[{data}]",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg, dep = load_pipeline_config(None, [*base, "deployment_type=cpu", "reward_model=sft", *extra])
    layout = Layout(Path(cfg.output_dir), cfg.step_names)
    return cfg, dep, layout, step_configs(cfg, layout)


def test_a_bad_step3_setting_fails_before_step1_and_writes_nothing(tmp_path, fixture_dir, data):
    from chatforge.pipeline import run_pipeline

    cfg, dep, layout, _ = _pipeline(tmp_path, fixture_dir, data, "ppo.rollout.batch_size=0")
    with pytest.raises(ConfigError, match=r"^ppo: rollout.batch_size must be >= 1"):
        run_pipeline(cfg, dep)
    assert not layout.root.exists()


def test_a_later_step_records_the_earlier_step_it_is_made_from(tmp_path, fixture_dir, data):
    from chatforge.pipeline.run import records_of, validate_all

    def records(*extra: str) -> dict:
        cfg, _, layout, configs = _pipeline(tmp_path, fixture_dir, data, *extra)
        validate_all(cfg, configs, layout)
        return records_of(configs, layout)

    base, changed = records(), records("sft.optim.warmup=0.1")
    sft_out = str(tmp_path / "run" / "actor-sft")
    assert base[2]["inputs"][f"model:{sft_out}"].startswith("sft@")  # reward model starts from step 1
    assert base[1] != changed[1] and base[2] != changed[2] and base[3] != changed[3]
    external = records("reward_model=" + str(fixture_dir / "reward-llama"))
    external_changed = records("reward_model=" + str(fixture_dir / "reward-llama"), "sft.optim.warmup=0.1")
    assert external[2] == external_changed[2]  # a reward model from elsewhere does not depend on step 1
    assert external[3] != external_changed[3]  # step 3's actor is step 1's output


# --- the real command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(fixture_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rerun") / "run"
    proc = _train(fixture_dir / "llama", data, out, "sft.train.max_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_same_command_skips_the_finished_step(finished, fixture_dir, data):
    before = _tree(finished / "runs")
    proc = _train(
        fixture_dir / "llama", data, finished, "sft.train.max_steps=2", "sft.train.report_to=[tensorboard]"
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 1 (sft): already finished from the same inputs, skipping" in proc.stdout
    assert _tree(finished / "runs") == before  # train.report_to is how a step runs, not what it is made of


def test_restart_from_redoes_the_step_with_the_new_inputs(finished, fixture_dir, data, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    proc = _train(fixture_dir / "llama", data, out, "sft.train.max_steps=3", "--restart-from", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--restart-from 1: deleting {out / 'runs' / 'sft'}" in proc.stdout
    record = json.loads((out / "runs" / "sft" / "made_from.json").read_text())
    assert record["settings"]["train.max_steps"] == 3 and _train_steps(out) == [1, 2, 3]


def test_after_a_crash_another_model_is_refused_and_the_same_command_resumes(fixture_dir, data, tmp_path):
    out = tmp_path / "run"
    steps = ("sft.train.max_steps=4", "sft.train.save_every=1")
    crashed = _train(fixture_dir / "llama", data, out, *steps, env=_env(CHATFORGE_FAULT_AT_STEP="2"))
    assert crashed.returncode == 1
    assert crashed.stderr.strip().splitlines()[-1] == (
        f"chatforge train: step 1 (sft) failed (exit code 17); see the log above and {out / 'runs' / 'sft'}. "
        "Rerun the same command to resume from its last checkpoint."
    )
    before = _tree(out)
    other = _train(fixture_dir / "qwen2", data, out, *steps)
    assert other.returncode == 2 and other.stdout == ""
    assert other.stderr.strip() == (
        f"chatforge train: step 'sft' in {out / 'runs' / 'sft'} (interrupted) was made from other inputs: "
        f"setting model.name_or_path was {fixture_dir / 'llama'}, now {fixture_dir / 'qwen2'}. Use a new "
        "--output-dir, or --restart-from <step> to redo it (and the steps after it) with the new inputs"
    )
    assert _tree(out) == before  # config.yaml, the checkpoint and the record untouched
    resumed = _train(fixture_dir / "llama", data, out, *steps)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _train_steps(out) == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after the resume


@pytest.mark.multiproc
def test_a_bad_input_inside_a_step_under_torchrun_is_one_line(fixture_dir, data, tmp_path):
    out = tmp_path / "run"
    # Only the step finds this one: 2 ranks x 64 rows per step, and the SFT part has 23 rows.
    proc = _train(fixture_dir / "llama", data, out, "num_processes=2", "sft.batch.micro_batch_size=64")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "launcher=torchrun" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "chatforge train: step 1 (sft): the sft split has 23 training rows: too few for one optimizer step of 128 "
        "rows over all ranks. Fix: lower the batch size (batch.micro_batch_size, rollout.batch_size), give the "
        "step a larger share of the data, or add data"
    ]


def test_ctrl_c_stops_the_step_and_exits_130(fixture_dir, data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chatforge", "train", "--actor-model", str(fixture_dir / "llama"), "--data",
           str(data), "--output-dir", str(out), "--deployment-type", "cpu", "--step", "1", *TINY,
           "sft.train.max_steps=100000", "sft.batch.epochs=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and '"phase": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # to the parent alone: it must stop the step process itself
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == (
        "chatforge train: interrupted; rerun the same chatforge train command to resume from the last checkpoint"
    )
    step = subprocess.run(
        ["pgrep", "-f", "--", f"--config {out}/configs/step1-sft.yaml"], capture_output=True
    )
    assert step.returncode == 1, "the step process outlived the command"
