"""`chatforge ppo` on 2 processes with all four models under ZeRO-3 (ranks generate different lengths),
and crash + resume giving the same iteration as an unbroken run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chatforge.config import save_yaml
from chatforge.trainers.common import read_metrics
from tests.dist_utils import launch
from tests.trainers.test_ppo import make_config, task_files  # noqa: F401 - the fixture is reused

ZERO3 = {"zero_stage": 3}


def _run_cli(config: Path, *extra: str, env: dict | None = None) -> None:
    launch(["-m", "chatforge.cli", "ppo", "--config", str(config), *extra], nproc=2, env=env)


def _train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "train"}


def _same(a: dict, b: dict) -> bool:
    keys = [k for k in a if not k.startswith("time") and k != "phase"]
    return all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in keys)


@pytest.mark.multiproc
def test_zero3_two_ranks_and_resume_after_crash(fixture_dir, task_files, tmp_path):  # noqa: F811
    def config(out: Path) -> Path:
        cfg = make_config(
            fixture_dir, task_files, out,
            actor_engine=ZERO3, critic_engine=ZERO3, ref_engine=ZERO3, reward_engine=ZERO3,
            ema={"enabled": True, "decay": 0.5}, train__max_steps=3, train__save_every=1,
            generation={"max_new_tokens": 8, "temperature": 1.3},
        )  # fmt: skip
        path = tmp_path / f"{out.name}.yaml"
        save_yaml(cfg, path)
        return path

    whole = tmp_path / "whole"
    _run_cli(config(whole))
    broken = tmp_path / "broken"
    with pytest.raises(AssertionError):
        _run_cli(config(broken), env={"CHATFORGE_FAULT_AT_STEP": "2"})
    assert not (broken / "DONE").exists()
    _run_cli(config(broken), "--resume")

    ref, got = _train_records(whole), _train_records(broken)
    assert sorted(ref) == [1, 2, 3]
    assert ref[1]["kl"] == 0.0 and ref[1]["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert _same(ref[3], got[3]), (ref[3], got[3])
    for sub in ("actor", "actor-ema"):
        assert (broken / sub / "model.safetensors").is_file(), sub
