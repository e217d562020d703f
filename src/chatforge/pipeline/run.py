"""Run steps 1-3 in order, each step's output feeding the next; rerunning skips finished steps and
resumes an interrupted one. Each step runs in its own process group (under the deployment's launcher),
so its memory is returned before the next step starts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import ConfigError, load_config, save_yaml

from .config import PipelineConfig
from .presets import Deployment, choose

STEP_NAMES = {1: "sft", 2: "reward", 3: "ppo"}


class PipelineError(RuntimeError):
    """A step failed; the message says which and how to resume."""


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def actor_sft(self) -> Path:
        return self.root / "actor-sft"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    @property
    def actor_rlhf(self) -> Path:
        return self.root / "actor-rlhf"

    @property
    def actor_rlhf_ema(self) -> Path:
        return self.root / "actor-rlhf-ema"

    def run_dir(self, step: int) -> Path:
        return self.root / "runs" / STEP_NAMES[step]

    def step_config(self, step: int) -> Path:
        return self.root / "configs" / f"step{step}-{STEP_NAMES[step]}.yaml"

    def done(self, step: int) -> bool:
        return (self.run_dir(step) / "DONE").is_file()


def load_pipeline_config(path: str | None, overrides: list[str]) -> tuple[PipelineConfig, Deployment]:
    """Defaults <- deployment preset <- YAML <- overrides: the preset fills engine settings, and the
    user's own values (file or command line) always win."""
    first = load_config(PipelineConfig, path, overrides)
    reward_model = first.reward_model if first.reward_model not in ("", "sft") else first.actor_model
    deployment = choose(first.deployment_type, first.actor_model, reward_model)
    cfg = load_config(PipelineConfig, path, overrides, base=preset_overrides(deployment))
    if cfg.actor_zero_stage is not None or cfg.reward_zero_stage is not None:
        _apply_stages(cfg, cfg.actor_zero_stage, cfg.reward_zero_stage)
    return cfg, deployment


def preset_overrides(dep: Deployment) -> dict:
    """The preset as a nested dict of step settings (so explicit user values override it)."""

    def engine(stage: int, trained: bool) -> dict:
        out = {"zero_stage": stage}
        if trained and dep.offload and stage >= 1:
            out["offload_optimizer"] = True
        if trained and dep.lora_r:
            out["lora"] = {"r": dep.lora_r}
        return out

    return {
        "sft": {"engine": engine(dep.actor_zero, True)},
        "reward": {"engine": engine(dep.reward_zero, True)},
        "ppo": {
            "actor_engine": engine(dep.actor_zero, True),
            "ref_engine": engine(dep.actor_zero, False),
            "critic_engine": engine(dep.reward_zero, True),
            "reward_engine": engine(dep.reward_zero, False),
        },
    }


def _apply_stages(cfg: PipelineConfig, actor: int | None, reward: int | None) -> None:
    if actor is not None:
        cfg.sft.engine.zero_stage = cfg.ppo.actor_engine.zero_stage = cfg.ppo.ref_engine.zero_stage = actor
    if reward is not None:
        cfg.reward.engine.zero_stage = cfg.ppo.critic_engine.zero_stage = reward
        cfg.ppo.reward_engine.zero_stage = reward


def step_configs(cfg: PipelineConfig, layout: Layout) -> dict[int, object]:
    """Each step's full config, wired to the previous step's output."""
    sft, reward, ppo = copy.deepcopy(cfg.sft), copy.deepcopy(cfg.reward), copy.deepcopy(cfg.ppo)
    sft.model.name_or_path = cfg.actor_model
    sft.data = copy.deepcopy(cfg.data)
    sft.train.output_dir, sft.train.final_model_dir, sft.train.resume = (
        str(layout.run_dir(1)),
        str(layout.actor_sft),
        True,
    )
    if cfg.reward_model == "sft":
        reward.model.name_or_path = str(layout.actor_sft)
    else:
        reward.model.name_or_path = cfg.reward_model or cfg.actor_model
    reward.data = copy.deepcopy(cfg.data)
    reward.train.output_dir, reward.train.final_model_dir = str(layout.run_dir(2)), str(layout.reward)
    reward.train.resume = True
    ppo.actor.name_or_path, ppo.reward.name_or_path = str(layout.actor_sft), str(layout.reward)
    ppo.critic.name_or_path = ppo.critic.name_or_path or str(layout.reward)
    ppo.ref.name_or_path = ppo.ref.name_or_path or str(layout.actor_sft)
    ppo.data = copy.deepcopy(cfg.data)
    ppo.ema.enabled = True  # the pipeline promises DIR/actor-rlhf-ema
    t = ppo.train
    t.output_dir, t.final_model_dir, t.ema_model_dir = (
        str(layout.run_dir(3)),
        str(layout.actor_rlhf),
        str(layout.actor_rlhf_ema),
    )
    t.resume = True
    return {1: sft, 2: reward, 3: ppo}


def launcher_prefix(dep: Deployment, hostfile: str | None) -> list[str]:
    """The command that precedes `chatforge.cli <step> ...` (run as a module)."""
    if dep.launcher == "none" or dep.processes == 1 and dep.launcher != "deepspeed":
        return [sys.executable, "-m"]
    if dep.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={dep.processes}",
            f"--master_port={_free_port()}",
            "-m",
        ]
    return ["deepspeed", f"--hostfile={hostfile}", "--no_local_rank", "--module"]


def run_pipeline(cfg: PipelineConfig, dep: Deployment) -> Layout:
    layout = Layout(Path(cfg.output_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, layout.root / "config.yaml")
    print(f"deployment: {dep.name} -- {dep.reason}")
    print(f"  processes={dep.processes} launcher={dep.launcher} actor ZeRO-{cfg.sft.engine.zero_stage} "
          f"reward ZeRO-{cfg.reward.engine.zero_stage} offload={dep.offload} lora_r={cfg.sft.engine.lora.r}")  # fmt: skip
    configs = step_configs(cfg, layout)
    for step in sorted(cfg.steps):
        _run_step(step, configs[step], dep, cfg.hostfile, layout)
    if cfg.report:
        from chatforge.report import build_report

        print(f"report: {build_report(layout.root)}")
    return layout


def _run_step(step: int, step_cfg, dep: Deployment, hostfile: str | None, layout: Layout) -> None:
    name = STEP_NAMES[step]
    if layout.done(step):
        print(f"step {step} ({name}): already finished, skipping (delete {layout.run_dir(step)} to redo it)")
        return
    _check_inputs(step, layout)
    path = layout.step_config(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(step_cfg, path)
    cmd = [*launcher_prefix(dep, hostfile), "chatforge.cli", name, "--config", str(path)]
    print(f"step {step} ({name}): {' '.join(cmd)}", flush=True)
    code = subprocess.call(cmd, env={**os.environ, "CHATFORGE_PIPELINE_STEP": str(step)})
    if code != 0 or not layout.done(step):
        raise PipelineError(
            f"step {step} ({name}) failed (exit code {code}); see the log above and {layout.run_dir(step)}. "
            "Rerun the same command to resume from its last checkpoint."
        )


def _check_inputs(step: int, layout: Layout) -> None:
    needs = {2: [], 3: [layout.actor_sft, layout.reward]}.get(step, [])
    for path in needs:
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"step {step} needs {path} (from an earlier step); run with --step 1 2 3 or point to it"
            )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
