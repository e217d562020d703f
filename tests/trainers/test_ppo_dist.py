"""`chatforge ppo` on 2 processes: a run killed after iteration 2 and resumed continues exactly like an
unbroken one (each rank's sampler and RNG, the KL coefficient, the prompt and mini-batch order) at ZeRO 0,
2 and 3; the KL coefficient is the same on both ranks; and step 3 runs with Ulysses sequence parallelism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chatforge.config import save_yaml
from chatforge.trainers.run_dir import read_metrics
from tests.dist_utils import launch
from tests.trainers.test_ppo import make_config


def _run_cli(config: Path, *extra: str, env: dict | None = None) -> None:
    launch(["-m", "chatforge.cli", "ppo", "--config", str(config), *extra], nproc=2, env=env)


def _train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "train"}


def _same(a: dict, b: dict) -> bool:
    keys = [k for k in a if not k.startswith("time") and k != "phase"]
    return all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in keys)


def _config(fixture_dir, task_files, tmp_path, out: Path, stage: int, **extra) -> Path:
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, out,
        actor={"zero_stage": stage, "learning_rate": 1e-3}, critic={"zero_stage": stage},
        ema={"decay": 0.5}, train={"max_steps": 4, "save_every": 1},
        rollout={"max_new_tokens": 8, "temperature": 1.3}, algorithm={"kl_target": 0.5, "kl_limit": None},
        **extra,
    )  # fmt: skip
    path = tmp_path / f"{out.name}.yaml"
    save_yaml(cfg, path)
    return path


@pytest.mark.multiproc
# ZeRO-3 (parameters sharded: the hardest to restore) in the default suite; 0 and 2 in the slow one (~45 s each).
@pytest.mark.parametrize(
    "stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_resume_after_a_crash_equals_an_unbroken_run(fixture_dir, task_files, tmp_path, stage):
    whole = tmp_path / "whole"
    _run_cli(_config(fixture_dir, task_files, tmp_path, whole, stage))
    broken = tmp_path / "broken"
    with pytest.raises(AssertionError):
        _run_cli(
            _config(fixture_dir, task_files, tmp_path, broken, stage), env={"CHATFORGE_FAULT_AT_STEP": "2"}
        )
    assert not (broken / "DONE").exists()
    _run_cli(_config(fixture_dir, task_files, tmp_path, broken, stage), "--resume")

    ref, got = _train_records(whole), _train_records(broken)
    assert sorted(ref) == [1, 2, 3, 4]
    assert ref[1]["kl"] == 0.0 and ref[1]["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert ref[4]["kl_coef"] != ref[1]["kl_coef"]  # the adaptive controller moved: its state is resumed
    for step in (3, 4):  # each rank's sampler continued where it stopped: the same rollouts and updates
        assert _same(ref[step], got[step]), (step, ref[step], got[step])
    for sub in ("actor", "actor-ema"):
        assert (broken / sub / "model.safetensors").is_file(), sub


@pytest.mark.multiproc
def test_sequence_parallel_step3_runs_exactly_at_sp2(fixture_dir, task_files, tmp_path):
    """SP=2 on 2 ranks: the group samples its rollouts once (each rank a share) and trains on them with
    sharded forwards: KL 0 and ratio 1 before the first update, as at SP=1."""
    out = tmp_path / "sp2"
    cfg = _config(
        fixture_dir, task_files, tmp_path, out, 0, engine={"sequence_parallel_size": 2, "precision": "fp32"}
    )
    _run_cli(cfg)
    first = _train_records(out)[1]
    assert first["kl"] == 0.0 and first["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_frac_first"] == 0.0 and (out / "actor" / "model.safetensors").is_file()
