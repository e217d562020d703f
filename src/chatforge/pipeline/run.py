"""Run the steps in order, each step's output feeding the next; rerunning skips finished steps and resumes an
interrupted one, but only when the step would be made from the same inputs. Each step runs in its own process
group (under the deployment's launcher), so its memory is returned before the next step starts."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import ConfigError, load_config, save_yaml

from .config import PipelineConfig, refuse_filled
from .inputs import check_rerun, made_from, record_digest, write_made_from
from .launch import launch
from .presets import Deployment, choose

OUTPUTS = {"sft": "actor-sft", "reward": "reward", "dpo": "actor-dpo", "ppo": "actor-rlhf"}


class PipelineError(RuntimeError):
    """A step crashed; the message says which and that rerunning the command resumes it."""

    exit_code = 1


class BadStepInput(ConfigError):
    """A step stopped on bad input (its own one-line error); resuming cannot help."""


@dataclass(frozen=True)
class Layout:
    root: Path
    names: dict[int, str]

    def output(self, step: int) -> Path:
        return self.root / OUTPUTS[self.names[step]]

    @property
    def actor_sft(self) -> Path:
        return self.root / OUTPUTS["sft"]

    @property
    def reward(self) -> Path:
        return self.root / OUTPUTS["reward"]

    @property
    def actor_rlhf(self) -> Path:
        return self.root / OUTPUTS["ppo"]

    @property
    def actor_rlhf_ema(self) -> Path:
        return self.root / f"{OUTPUTS['ppo']}-ema"

    def run_dir(self, step: int) -> Path:
        return self.root / "runs" / self.names[step]

    def step_config(self, step: int) -> Path:
        return self.root / "configs" / f"step{step}-{self.names[step]}.yaml"

    def done(self, step: int) -> bool:
        return (self.run_dir(step) / "DONE").is_file()


def load_pipeline_config(path: str | None, overrides: list[str]) -> tuple[PipelineConfig, Deployment]:
    """Defaults <- deployment preset <- YAML <- overrides: the preset fills engine settings, and the
    user's own values (file or command line) always win. Keys the pipeline fills itself are refused."""
    import yaml

    if path is not None and Path(path).is_file():
        refuse_filled([], yaml.safe_load(Path(path).read_text()) or {})
    refuse_filled(overrides, {})
    first = load_config(PipelineConfig, path, overrides)
    reward_model = first.reward_model if first.reward_model not in ("", "sft", "none") else first.actor_model
    trust = first.sft.engine.trust_remote_code
    deployment = choose(first.deployment_type, first.actor_model, reward_model, first.num_processes, trust)
    cfg = load_config(PipelineConfig, path, overrides, base=preset_overrides(deployment))
    _apply_stages(cfg, cfg.actor_zero_stage, cfg.reward_zero_stage)
    return cfg, deployment


def preset_overrides(dep: Deployment) -> dict:
    """The preset as a nested dict of step settings (so explicit user values override it)."""

    def model(stage: int) -> dict:
        return {"zero_stage": stage, **({"lora_r": dep.lora_r} if dep.lora_r else {})}

    engine = {"offload": True} if dep.offload else {}
    return {
        "sft": {"model": model(dep.actor_zero), "engine": engine},
        "reward": {"model": model(dep.reward_zero), "engine": engine},
        "dpo": {"policy": model(dep.actor_zero), "engine": engine},
        "ppo": {
            "actor": model(dep.actor_zero), "critic": model(dep.reward_zero), "engine": engine,
            "ema": {"decay": 0.992},  # the pipeline writes DIR/actor-rlhf-ema unless decay=0 is asked
        },
    }  # fmt: skip


def _apply_stages(cfg: PipelineConfig, actor: int | None, reward: int | None) -> None:
    if actor is not None:
        cfg.sft.model.zero_stage = cfg.ppo.actor.zero_stage = cfg.dpo.policy.zero_stage = actor
    if reward is not None:
        cfg.reward.model.zero_stage = cfg.ppo.critic.zero_stage = reward


def step_configs(cfg: PipelineConfig, layout: Layout) -> dict[int, object]:
    """Each step's full config, wired to the previous step's output."""
    configs: dict[int, object] = {}
    for step, name in layout.names.items():
        step_cfg = copy.deepcopy(getattr(cfg, name))
        step_cfg.data = _data_for(cfg.data, type(step_cfg.data))
        t = step_cfg.train
        t.output_dir, t.final_model_dir, t.resume, t.seed = (
            str(layout.run_dir(step)),
            str(layout.output(step)),
            True,
            cfg.seed,
        )
        configs[step] = step_cfg
    configs[1].model.name_or_path = cfg.actor_model
    sft_out = str(layout.actor_sft)
    if cfg.mode == "dpo":
        configs[2].policy.name_or_path = configs[2].ref.name_or_path = sft_out
        return configs
    reward = configs[2]
    reward.model.name_or_path = (
        sft_out if cfg.reward_model == "sft" else (cfg.reward_model or cfg.actor_model)
    )
    ppo = configs[3]
    ppo.actor.name_or_path = sft_out
    ppo.ref.name_or_path = ppo.ref.name_or_path or sft_out
    if cfg.uses_reward_model:
        ppo.reward.models = [str(layout.reward), *ppo.reward.models]
    if not cfg.uses_reward_model:
        configs.pop(2)
    return configs


def _data_for(shared, cls):
    """The shared data section as a step's own data class (the fields that step reads)."""
    names = set(cls.__dataclass_fields__)
    return cls(**{k: copy.deepcopy(v) for k, v in vars(shared).items() if k in names})


def validate_all(cfg: PipelineConfig, configs: dict[int, object], layout: Layout) -> None:
    """Every step's settings and the models the pipeline starts from, checked before step 1 starts: a typo
    in a step-3 setting or a missing model dir fails now, not after hours of training (the data: see
    `check_data`)."""
    from chatforge.models.sources import check_model_source, check_tokenizer_files

    for step, step_cfg in configs.items():
        _validate_step(step_cfg, layout.names[step])
    for path in {configs[1].model.name_or_path, *_external_models(configs, layout)}:
        check_model_source(path, cfg.sft.engine.trust_remote_code)
    for step_cfg in (c for c in configs.values() if hasattr(c, "model")):  # steps 1-2 read their tokenizer
        check_tokenizer_files(step_cfg.model.name_or_path)


def check_data(cfg: PipelineConfig, configs: dict[int, object], layout: Layout, steps: list[int]) -> None:
    """The data every step in `steps` reads can feed it (a chat-only file cannot feed a reward model)."""
    from chatforge.data.pipeline import check_step_data

    for step in steps:
        name, step_cfg = layout.names[step], configs[step]
        check_step_data(
            cfg.data, {"sft": "sft", "reward": "reward", "dpo": "reward", "ppo": "ppo"}[name], name
        )
        if name == "ppo" and step_cfg.ptx.coef > 0:
            check_step_data(step_cfg.ptx, "ptx", "ppo.ptx")


def _external_models(configs: dict[int, object], layout: Layout) -> list[str]:
    """Model dirs of steps 2-3 that no earlier step writes (e.g. --reward-model, ppo.reward.models)."""
    from chatforge.config.rl import strip_weight

    outputs = {str(layout.output(s).resolve()) for s in layout.names}
    found = []
    for step_cfg in list(configs.values())[1:]:
        for section in ("model", "policy", "ref", "actor", "critic"):
            path = getattr(getattr(step_cfg, section, None), "name_or_path", None)
            found += [path] if path else []
        found += [strip_weight(m) for m in getattr(getattr(step_cfg, "reward", None), "models", [])]
    return [p for p in found if str(Path(p).resolve()) not in outputs]


def _validate_step(step_cfg, name: str) -> None:
    try:
        step_cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def records_of(configs: dict[int, object], layout: Layout) -> dict[int, dict]:
    """Each step's made_from record; a step reading an earlier step's output records that step's digest."""
    records: dict[int, dict] = {}
    produced: dict[str, str] = {}
    for step in sorted(configs):
        records[step] = made_from(configs[step], layout.names[step], layout.root, produced)
        produced[str(layout.output(step).resolve())] = record_digest(records[step])
    return records


def run_pipeline(cfg: PipelineConfig, dep: Deployment, restart_from: int | None = None) -> Layout:
    """Validate everything, check a rerun against what the finished steps were made from, then run the
    steps. `restart_from=N` deletes the run dirs and outputs of steps N and later first (a new run of them),
    once every check passed."""
    layout = Layout(Path(cfg.output_dir), cfg.step_names)
    configs = step_configs(cfg, layout)
    steps = [s for s in cfg.selected_steps if s in configs]
    if restart_from is not None and restart_from not in steps:
        raise ConfigError(f"--restart-from {restart_from}: not one of the steps this command runs ({steps})")
    check_output_dir(layout.root)
    validate_all(cfg, configs, layout)
    records = records_of(configs, layout)
    check_earlier_outputs(records, layout, steps)
    for step in steps:
        if restart_from is None or step < restart_from:
            check_rerun(layout.run_dir(step), layout.names[step], records[step], layout.done(step))
    check_data(cfg, configs, layout, steps)
    if restart_from is not None:
        _delete_steps_from(restart_from, layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, layout.root / "config.yaml")
    print(f"deployment: {dep.name} -- {dep.reason}")
    print(f"  processes={dep.processes} launcher={dep.launcher} actor ZeRO-{cfg.sft.model.zero_stage} "
          f"reward ZeRO-{cfg.reward.model.zero_stage} offload={dep.offload} lora_r={cfg.sft.model.lora_r}")  # fmt: skip
    for step in steps:
        _run_step(step, configs[step], records[step], dep, cfg.hostfile, layout)
    if cfg.report:
        from chatforge.report import build_report

        print(f"report: {build_report(layout.root)}")
    return layout


def _delete_steps_from(first: int, layout: Layout) -> None:
    for step in (s for s in layout.names if s >= first):
        for path in (layout.run_dir(step), layout.output(step), Path(f"{layout.output(step)}-ema")):
            if path.exists():
                print(f"--restart-from {first}: deleting {path}")
                shutil.rmtree(path)


def _run_step(
    step: int, step_cfg, record: dict, dep: Deployment, hostfile: str | None, layout: Layout
) -> None:
    name = layout.names[step]
    if layout.done(step):
        print(f"step {step} ({name}): already finished from the same inputs, skipping")
        return
    path = layout.step_config(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(step_cfg, path)
    layout.run_dir(step).mkdir(parents=True, exist_ok=True)
    write_made_from(layout.run_dir(step), record)
    cmd = [*launcher_prefix(dep, hostfile), "chatforge.cli", name, "--config", str(path)]
    print(f"step {step} ({name}): {' '.join(cmd)}", flush=True)
    error_file = layout.run_dir(step) / "ERROR"
    for old in error_file.parent.glob("ERROR*"):
        old.unlink()
    env = {**os.environ, "CHATFORGE_PIPELINE_STEP": str(step), "CHATFORGE_ERROR_FILE": str(error_file)}
    if dep.launcher == "torchrun":
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning about it
    code = launch(cmd, env, error_file, hide_launcher_report=uses_launcher(dep))
    _raise_step_failure(step, name, code, error_file, layout)


def _raise_step_failure(step: int, name: str, code: int, error_file: Path, layout: Layout) -> None:
    """The step's own one-line error (first rank that wrote one), or the exit code: bad input is not
    resumable, a crash is."""
    if code == 0 and layout.done(step):
        return
    failure = read_step_error(error_file)
    if code == 130 or (failure and failure["code"] == 130):
        raise KeyboardInterrupt
    if failure and failure["code"] == 2:
        raise BadStepInput(f"step {step} ({name}): {failure['line']}")
    resume = "Rerun the same command to resume from its last checkpoint."
    if failure:
        line = failure["line"]
        raise PipelineError(f"step {step} ({name}): {line}" + ("" if "resume" in line else f". {resume}"))
    print(file=sys.stderr)  # a process that died hard may have left a progress bar's line open
    raise PipelineError(
        f"step {step} ({name}) failed (exit code {code}); see the log above and {layout.run_dir(step)}. {resume}"
    )


def read_step_error(error_file: Path) -> dict | None:
    """{code, line, rank} a step's rank wrote (rank 0's first), or None."""
    for path in [error_file, *sorted(error_file.parent.glob(error_file.name + ".rank*"))]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def check_earlier_outputs(records: dict[int, dict], layout: Layout, steps: list[int]) -> None:
    """A step that reads an earlier step's output (DIR/actor-sft, DIR/reward) needs that step finished, or
    running first in this command: `--step 3` before steps 1-2 fails now, not inside step 3."""
    by_name = {name: step for step, name in layout.names.items()}
    for step in steps:
        needed = {}  # earlier step -> the path of its output this step reads
        for key, value in records[step]["inputs"].items():
            earlier = by_name.get(str(value).partition("@")[0]) if "@" in str(value) else None
            if earlier is not None and earlier not in steps and not layout.done(earlier):
                needed.setdefault(earlier, key.partition(":")[2])
        if needed:
            first = min(needed)
            raise ConfigError(
                f"step {step} ({layout.names[step]}) reads {needed[first]}, the output of step {first} "
                f"({layout.names[first]}), which has not finished: run the earlier steps first "
                f"(--step {' '.join(map(str, sorted({*needed, *steps})))})"
            )


def check_output_dir(root: Path) -> None:
    """DIR must be a dir this process can create or write."""
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {root}: {existing} is a file. Fix: give a dir path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {root} is not writable ({existing}). Fix: give a writable dir")


def uses_launcher(dep: Deployment) -> bool:
    """Whether steps run under torchrun or the deepspeed launcher (else as one plain process)."""
    return not (dep.launcher == "none" or dep.processes == 1 and dep.launcher != "deepspeed")


def launcher_prefix(dep: Deployment, hostfile: str | None) -> list[str]:
    """The command that precedes `chatforge.cli <step> ...` (run as a module)."""
    if not uses_launcher(dep):
        return [sys.executable, "-m"]
    if dep.launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dep.processes}",
            f"--master_port={_free_port()}", "-m",
        ]  # fmt: skip
    return ["deepspeed", f"--hostfile={hostfile}", "--no_local_rank", "--module"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
