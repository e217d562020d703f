"""The config of `chatforge train`: the three steps, the data they share and where they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatforge.config import ConfigError, DataConfig, RewardConfig, SFTConfig
from chatforge.config.schema import PPOConfig

DeploymentType = Literal["auto", "cpu", "single_gpu", "single_node", "multi_node"]


@dataclass
class PipelineConfig:
    """Steps 1-3 end to end. `sft`, `reward` and `ppo` hold each step's own settings; the pipeline
    fills in the models, data and output dirs that connect them."""

    actor_model: str = ""
    """Step-1 starting model: hub name or local HF dir."""
    reward_model: str = ""
    """Step-2 starting backbone: hub name or local dir; 'sft' starts it from the step-1 output; empty = actor_model."""
    output_dir: str = "runs/pipeline"
    """Root of the run: actor-sft/, reward/, actor-rlhf/, actor-rlhf-ema/, runs/<step>/, report.html."""
    steps: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Which steps to run (finished ones are skipped on a rerun)."""
    deployment_type: DeploymentType = "auto"
    """Preset of processes, ZeRO stages, offload and LoRA (see docs/pipeline.md); 'auto' measures the machine."""
    actor_zero_stage: int | None = None
    """Override the preset's ZeRO stage of the actor (steps 1 and 3)."""
    reward_zero_stage: int | None = None
    """Override the preset's ZeRO stage of the reward model and critic (steps 2 and 3)."""
    num_processes: int | None = None
    """Override the preset's number of processes on this node."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi_node."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and the split across steps, shared by the three steps."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Step-1 settings (model, data and output dirs are filled in by the pipeline)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Step-2 settings."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Step-3 settings."""
    report: bool = True
    """Write report.html at the end."""

    def validate(self) -> None:
        if not self.actor_model:
            raise ConfigError("actor_model is required (--actor-model: a hub name or a local HF dir)")
        if not self.data.datasets:
            raise ConfigError("data.datasets is empty: pass --data PATH_OR_NAME[:weight] (one or more)")
        bad = [s for s in self.steps if s not in (1, 2, 3)]
        if bad or not self.steps:
            raise ConfigError(f"steps must be a non-empty subset of 1 2 3, got {self.steps}")
        for stage in (self.actor_zero_stage, self.reward_zero_stage):
            if stage is not None and stage not in (0, 1, 2, 3):
                raise ConfigError(f"ZeRO stages are 0-3, got {stage}")
        if self.deployment_type == "multi_node" and not self.hostfile:
            raise ConfigError("deployment_type=multi_node needs hostfile=PATH (a DeepSpeed hostfile)")
        self.data.validate()
