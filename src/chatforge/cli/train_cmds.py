"""`chatforge sft | reward`: config-driven training commands (YAML + `key=value` overrides)."""

from __future__ import annotations

import argparse
import importlib
import os

# command -> (config class path, trainer class path, one-line help)
CONFIG_COMMANDS = {
    "sft": (
        "chatforge.config:SFTConfig",
        "chatforge.trainers.sft:SFTTrainer",
        "step 1: supervised fine-tuning",
    ),
    "reward": (
        "chatforge.config:RewardConfig",
        "chatforge.trainers.reward:RewardTrainer",
        "step 2: train a pairwise reward model",
    ),
    "ppo": (
        "chatforge.config:PPOConfig",
        "chatforge.trainers.ppo:build_trainer",
        "step 3: online RL (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++) with reward models and/or rule rewards",
    ),
    "dpo": (
        "chatforge.config:DPOConfig",
        "chatforge.trainers.dpo:DPOTrainer",
        "DPO (or IPO / cDPO): preference pairs straight into the policy, instead of steps 2 + 3",
    ),
}


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def add_config_command(sub, name: str, config_path: str, trainer_path: str, help_text: str) -> None:
    """A subcommand taking `--config FILE` and `key=value` overrides of a typed config."""
    p = sub.add_parser(
        name,
        help=help_text,
        description=f"{help_text}. Settings come from the config's defaults, then --config, then key=value overrides.",
        epilog=f"Run `chatforge {name} --help-config` to list every key with its default and meaning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. model.name_or_path=DIR engine.zero_stage=3"
    )
    p.add_argument("--config", default=None, help="YAML file with the config (nested keys)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint (train.resume=true)"
    )
    p.add_argument(
        "--help-config", action="store_true", help="list every config key, its default and meaning"
    )
    p.set_defaults(handler=lambda args: run_config_command(args, config_path, trainer_path))


def load_command_config(args, config_path: str):
    from chatforge.config import load_config

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    return load_config(_resolve(config_path), args.config, overrides)


def run_config_command(args, config_path: str, trainer_path: str) -> int:
    if args.help_config:
        from chatforge.config import format_help

        print(format_help(_resolve(config_path)))
        return 0
    from chatforge.trainers.preflight import check_step_inputs

    from .quiet import quiet_transformers

    cfg = load_command_config(args, config_path)
    check_step_inputs(cfg, args.command)  # before torch and DeepSpeed load: bad input fails in a second
    _setup_logging()
    quiet_transformers()
    result = _resolve(trainer_path)(cfg).fit()
    if os.environ.get("RANK", "0") == "0":  # the same result on every rank: say it once
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})
    return 0


def _setup_logging() -> None:
    import logging
    import os

    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")


def register(sub) -> None:
    for name, (config_path, trainer_path, help_text) in CONFIG_COMMANDS.items():
        add_config_command(sub, name, config_path, trainer_path, help_text)
