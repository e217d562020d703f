"""A step's inputs checked from small files, without torch: the run dir, the model dirs (config, weights,
tokenizer, code), the reward models' score heads and functions, and the data sources. `chatforge
sft|reward|dpo|ppo` runs this before torch and DeepSpeed load, so a wrong path or a file of the wrong shape
fails in a second instead of after the imports and the process-group set-up (or after loading three models,
for step 3). The trainers keep their own checks for Python callers."""

from __future__ import annotations

from pathlib import Path

from .run_dir import check_run_dir

# step -> the part of each dataset it reads (DPO reads the preference pairs of step 2)
DATA_STEP = {"sft": "sft", "reward": "reward", "dpo": "reward", "ppo": "ppo"}


def check_step_inputs(config, step: str) -> None:
    """Raise the first problem as a one-line error (ConfigError, ModelLoadError, RunDirError, DataError,
    RewardFunctionError)."""
    from chatforge.data.pipeline import check_step_data
    from chatforge.models.sources import check_model_source, check_reward_model, check_tokenizer_files

    config.validate()
    check_run_dir(Path(config.train.output_dir), step, config.train.resume)
    trust = config.engine.trust_remote_code
    first, *others = _model_paths(config, step)
    check_model_source(first, trust)
    check_tokenizer_files(first)  # the tokenizer is read from the trained model's dir
    for path in others:
        check_model_source(path, trust)
    if step == "ppo":
        _check_rewards(config, check_model_source, check_reward_model)
    fix = "point data.datasets at data with those columns, or give this step a share in data.data_split"
    check_step_data(config.data, DATA_STEP[step], "data.datasets", fix)
    if step == "ppo" and config.ptx.coef > 0:
        check_step_data(
            config.ptx, "ptx", "ptx.datasets", "point ptx.datasets at plain text (a 'text' column)"
        )


def _model_paths(config, step: str) -> list[str]:
    """The step's own models, the trained one first (validate() has filled the defaults of ref and critic)."""
    if step in ("sft", "reward"):
        return [config.model.name_or_path]
    if step == "dpo":
        return [config.policy.name_or_path, config.ref.name_or_path]
    critic = [config.critic.name_or_path] if config.algorithm.has_critic else []
    return [config.actor.name_or_path, config.ref.name_or_path, *critic]


def _check_rewards(config, check_model_source, check_reward_model) -> None:
    from chatforge.rewards.functions import load_function, split_weight

    trust = config.engine.trust_remote_code
    gold_dirs = [g for g in config.eval.gold if ":" not in split_weight(g)[0]]
    for spec in [*config.reward.models, *gold_dirs]:
        path = split_weight(spec)[0]
        check_model_source(path, trust)
        check_reward_model(path)
    for spec in config.reward.functions:
        load_function(spec, "reward.functions")
    for spec in (g for g in config.eval.gold if g not in gold_dirs):
        load_function(spec, "eval.gold")
