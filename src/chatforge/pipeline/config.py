"""The config of `chatforge train`: the steps, the data they share and where they run.

`sft`, `reward`, `dpo` and `ppo` hold each step's own settings. The pipeline fills in what connects the
steps (models, data, run dirs, seed); those keys are not settings here (PIPELINE_FILLED), and setting one
is refused with a line saying which pipeline setting to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatforge.config import ConfigError, DPOConfig, PPOConfig, RewardConfig, SFTConfig, SFTDataConfig

DeploymentType = Literal["auto", "cpu", "single_gpu", "single_node", "multi_node"]
RUN_FILLED = ("output_dir", "final_model_dir", "resume", "seed")
# step section -> keys the pipeline fills (a section name means all of it), and what to use instead.
PIPELINE_FILLED: dict[str, tuple[tuple[str, ...], str]] = {
    "sft": (
        ("model.name_or_path", "data", *(f"train.{k}" for k in RUN_FILLED)),
        "actor_model, data.*, output_dir, seed",
    ),
    "reward": (
        ("model.name_or_path", "data", *(f"train.{k}" for k in RUN_FILLED)),
        "reward_model, data.*, output_dir, seed",
    ),
    "dpo": (
        ("policy.name_or_path", "ref.name_or_path", "data", *(f"train.{k}" for k in RUN_FILLED)),
        "data.*, output_dir, seed",
    ),
    "ppo": (("actor.name_or_path", "data", *(f"train.{k}" for k in RUN_FILLED)), "data.*, output_dir, seed"),
}


@dataclass
class PipelineConfig:
    """Steps 1-3 end to end, or SFT then DPO (mode=dpo)."""

    actor_model: str = ""
    """Step-1 starting model: hub name or local HF dir."""
    reward_model: str = ""
    """Step-2 starting backbone: hub name or local dir; 'sft' = the step-1 output; empty = actor_model; 'none' = no reward model (step 2 skipped: step 3 needs ppo.reward.functions)."""
    mode: Literal["rlhf", "dpo"] = "rlhf"
    """'rlhf' = SFT -> reward model -> online RL; 'dpo' = SFT -> DPO on the step-2 part of the data."""
    output_dir: str = "runs/pipeline"
    """Root of the run: actor-sft/, reward/, actor-rlhf/ (or actor-dpo/), runs/<step>/, report.html."""
    steps: list[int] = field(default_factory=list)
    """Which steps to run (empty = all of the mode's: 1 2 3, or 1 2 with mode=dpo); finished ones are skipped on a rerun."""
    seed: int = 1234
    """Seed of every step (train.seed)."""
    deployment_type: DeploymentType = "auto"
    """Preset of processes, ZeRO stages, offload and LoRA (see docs/pipeline.md); 'auto' measures the machine."""
    actor_zero_stage: int | None = None
    """Override the preset's ZeRO stage of the actor (steps 1, 3 and DPO)."""
    reward_zero_stage: int | None = None
    """Override the preset's ZeRO stage of the reward model and critic (steps 2 and 3)."""
    num_processes: int | None = None
    """Override the preset's number of processes on this node (more than 1 runs each step under torchrun)."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi_node."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Datasets and the split across steps, shared by every step."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Step-1 settings."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Step-2 settings (mode=rlhf)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Step-2 settings (mode=dpo)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Step-3 settings (mode=rlhf)."""
    report: bool = True
    """Write report.html at the end."""

    @property
    def step_names(self) -> dict[int, str]:
        return {1: "sft", 2: "dpo"} if self.mode == "dpo" else {1: "sft", 2: "reward", 3: "ppo"}

    @property
    def selected_steps(self) -> list[int]:
        return sorted(self.steps or self.step_names)

    @property
    def uses_reward_model(self) -> bool:
        return self.mode == "rlhf" and self.reward_model != "none"

    def validate(self) -> None:
        if not self.actor_model:
            raise ConfigError("actor_model is required (--actor-model: a hub name or a local HF dir)")
        if not self.data.datasets:
            raise ConfigError("data.datasets is empty: pass --data PATH_OR_NAME[:weight] (one or more)")
        bad = [s for s in self.steps if s not in self.step_names]
        if bad:
            raise ConfigError(
                f"steps must be a non-empty subset of {sorted(self.step_names)} (mode={self.mode}), got {self.steps}"
            )
        for stage in (self.actor_zero_stage, self.reward_zero_stage):
            if stage is not None and stage not in (0, 1, 2, 3):
                raise ConfigError(f"ZeRO stages are 0-3, got {stage}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.deployment_type == "multi_node" and not self.hostfile:
            raise ConfigError("deployment_type=multi_node needs hostfile=PATH (a DeepSpeed hostfile)")
        if self.mode == "rlhf" and not self.uses_reward_model and not self.ppo.reward.functions:
            raise ConfigError(
                "reward_model=none needs a rule reward for step 3: ppo.reward.functions=[module:function]"
            )
        self.data.validate()


def refuse_filled(overrides: list[str], yaml_data: dict) -> None:
    """A one-line error for a key the pipeline fills (e.g. sft.train.output_dir), from the command line or
    the YAML file."""
    keys = [o.split("=", 1)[0].strip().lstrip("-").replace("-", "_") for o in overrides if "=" in o]
    keys += list(_dotted(yaml_data))
    for key in keys:
        section, _, rest = key.partition(".")
        filled, instead = PIPELINE_FILLED.get(section, ((), ""))
        if any(rest == f or rest.startswith(f + ".") for f in filled):
            raise ConfigError(f"{key} is set by chatforge train itself (from {instead}); remove it")


def _dotted(tree: dict, prefix: str = ""):
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def hidden_keys() -> tuple[str, ...]:
    """Dotted keys `--help-config` leaves out: the ones the pipeline fills itself."""
    return tuple(f"{section}.{key}" for section, (keys, _) in PIPELINE_FILLED.items() for key in keys)
