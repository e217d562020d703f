"""Deployment presets, `auto` sizing and how the pipeline's settings layer (pure, fast)."""

from __future__ import annotations

import pytest

from chatforge.config import ConfigError
from chatforge.pipeline.presets import auto, preset, step3_bytes

GIB = 2**30


def test_step3_footprint_by_hand():
    # 1e9-param actor and reward, bf16, 8 ranks, ZeRO-3: (18 + 18) * 1e9 / 8 trained + (2 + 2) * 1e9 / 8 frozen
    assert step3_bytes(10**9, 10**9, 3, 3, 8, "bf16") == pytest.approx((36 + 4) * 10**9 / 8)
    # ZeRO-0: nothing is divided.
    assert step3_bytes(10**9, 0, 0, 0, 8, "bf16") == pytest.approx((18 + 2) * 10**9)
    # ZeRO-2 keeps bf16 weights whole and shards grads + optimizer states.
    assert step3_bytes(10**9, 0, 2, 2, 4, "bf16") == pytest.approx((2 + 16 / 4 + 2) * 10**9)


def test_auto_picks_smallest_stage_that_fits_and_says_why():
    small = auto(100_000_000, 100_000_000, gpus=8, gpu_bytes=80 * GIB, ram_bytes=512 * GIB)
    assert (small.actor_zero, small.processes, small.launcher) == (0, 8, "torchrun")
    big = auto(7 * 10**9, 7 * 10**9, gpus=8, gpu_bytes=80 * GIB, ram_bytes=512 * GIB)
    assert big.actor_zero == 3 and not big.offload and "ZeRO-3" in big.reason
    huge = auto(70 * 10**9, 70 * 10**9, gpus=8, gpu_bytes=80 * GIB, ram_bytes=512 * GIB)
    assert huge.offload and huge.lora_r > 0 and "LoRA" in huge.reason
    cpu = auto(10**6, 10**6, gpus=0, gpu_bytes=0, ram_bytes=24 * GIB)
    assert cpu.name == "cpu" and cpu.processes == 1 and "fits" in cpu.reason


def test_fixed_presets():
    assert preset("cpu", 0).launcher == "none"
    assert preset("single_node", 4).processes == 4
    assert preset("multi_node", 8).actor_zero == 3
    with pytest.raises(ValueError):
        preset("cloud", 1)


def test_user_settings_win_over_preset_and_flags_win_over_all(tmp_path):
    from chatforge.pipeline import load_pipeline_config

    overrides = ["actor_model=/some/model", "data.datasets=[x.jsonl]", "deployment_type=single_gpu"]
    cfg, dep = load_pipeline_config(None, overrides)
    assert dep.name == "single_gpu" and cfg.sft.model.zero_stage == 2 and cfg.sft.engine.offload
    assert cfg.ppo.ema.decay == 0.992  # the pipeline writes DIR/actor-rlhf-ema by default
    cfg, _ = load_pipeline_config(None, [*overrides, "sft.model.zero_stage=1", "ppo.ema.decay=0"])
    assert cfg.sft.model.zero_stage == 1 and cfg.reward.model.zero_stage == 2 and cfg.ppo.ema.decay == 0
    cfg, _ = load_pipeline_config(None, [*overrides, "actor_zero_stage=3", "reward_zero_stage=0"])
    assert (cfg.sft.model.zero_stage, cfg.ppo.actor.zero_stage, cfg.dpo.policy.zero_stage) == (3, 3, 3)
    assert (cfg.reward.model.zero_stage, cfg.ppo.critic.zero_stage) == (0, 0)


def test_num_processes_overrides_the_preset():
    from chatforge.pipeline import load_pipeline_config

    _, dep = load_pipeline_config(
        None, ["actor_model=/m", "data.datasets=[x]", "deployment_type=cpu", "num_processes=2"]
    )
    assert dep.processes == 2 and dep.launcher == "torchrun"


def test_step_configs_wire_outputs_to_inputs(tmp_path):
    from chatforge.pipeline import load_pipeline_config
    from chatforge.pipeline.run import Layout, step_configs

    overrides = ["actor_model=/m", "reward_model=sft", "data.datasets=[d.jsonl]", "deployment_type=cpu"]
    cfg, _ = load_pipeline_config(None, [*overrides, f"output_dir={tmp_path}", "seed=7"])
    sft, reward, ppo = step_configs(cfg, Layout(tmp_path, cfg.step_names)).values()
    assert sft.model.name_or_path == "/m" and sft.train.final_model_dir == str(tmp_path / "actor-sft")
    assert reward.model.name_or_path == str(tmp_path / "actor-sft")
    assert ppo.actor.name_or_path == str(tmp_path / "actor-sft") and ppo.reward.models == [
        str(tmp_path / "reward")
    ]
    assert ppo.train.final_model_dir == str(tmp_path / "actor-rlhf") and ppo.ema.decay > 0
    assert sft.data.datasets == reward.data.datasets == ppo.data.datasets == ["d.jsonl"]
    assert sft.train.resume and reward.train.resume and ppo.train.resume
    assert sft.train.seed == reward.train.seed == ppo.train.seed == 7
    # Rule rewards only: no step 2, no reward model in step 3; DPO mode: SFT then DPO from it.
    cfg, _ = load_pipeline_config(None, [*overrides[:1], *overrides[2:], "reward_model=none",
                                         "ppo.reward.functions=[m:f]", f"output_dir={tmp_path}"])  # fmt: skip
    configs = step_configs(cfg, Layout(tmp_path, cfg.step_names))
    assert sorted(configs) == [1, 3] and configs[3].reward.models == []
    cfg, _ = load_pipeline_config(None, [*overrides, "mode=dpo", f"output_dir={tmp_path}"])
    sft, dpo = step_configs(cfg, Layout(tmp_path, cfg.step_names)).values()
    assert dpo.policy.name_or_path == dpo.ref.name_or_path == str(tmp_path / "actor-sft")
    assert dpo.train.final_model_dir == str(tmp_path / "actor-dpo")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [([], "actor_model is required"), (["actor_model=m"], "data.datasets is empty"),
     (["actor_model=m", "data.datasets=[d]", "steps=[4]"], "subset of"),
     (["actor_model=m", "data.datasets=[d]", "deployment_type=multi_node"], "hostfile"),
     (["actor_model=m", "data.datasets=[d]", "reward_model=none"], "ppo.reward.functions"),
     (["actor_model=m", "data.datasets=[d]", "mode=dpo", "steps=[3]"], "subset of")],
)  # fmt: skip
def test_bad_pipeline_configs_are_named(overrides, message):
    from chatforge.config import load_config
    from chatforge.pipeline.config import PipelineConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, None, overrides)


@pytest.mark.parametrize(
    "override",
    ["sft.train.output_dir=x", "ppo.actor.name_or_path=y", "reward.data.datasets=[z]", "sft.train.seed=3"],
)
def test_keys_the_pipeline_fills_are_refused(override):
    from chatforge.pipeline import load_pipeline_config

    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} is set by chatforge train itself"):
        load_pipeline_config(None, ["actor_model=/m", "data.datasets=[d]", override])
