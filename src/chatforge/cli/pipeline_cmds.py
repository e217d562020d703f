"""`chatforge train` (steps 1-3 end to end) and `chatforge demo` (the whole pipeline on a built-in task)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run steps 1 (SFT), 2 (reward model) and 3 (online RL) end to end, resumably (or SFT -> DPO)",
        description="Run the InstructGPT pipeline. Outputs: DIR/actor-sft, DIR/reward, DIR/actor-rlhf, "
        "DIR/actor-rlhf-ema (plain HF dirs) and DIR/report.html (mode=dpo: DIR/actor-sft, DIR/actor-dpo). "
        "Rerunning the same command skips finished steps and resumes an interrupted one; a rerun with other "
        "data, models or settings is refused (use a new --output-dir, or --restart-from N).",
        epilog="Per-step settings: sft.*, reward.*, ppo.*, dpo.* keys (see `chatforge sft --help-config` etc.), "
        "e.g. sft.batch.epochs=2 ppo.algorithm.name=grpo. Run `chatforge train --help-config` for all keys.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (win over --config)")
    p.add_argument("--actor-model", help="step-1 model: hub name or local HF dir")
    p.add_argument(
        "--reward-model",
        help="step-2 backbone (hub name, dir, 'sft' for the step-1 output, or 'none' for rule rewards only)",
    )
    p.add_argument(
        "--data", nargs="+", metavar="SPEC", help="datasets: name_or_path[:weight] (see docs/data.md)"
    )
    p.add_argument(
        "--mode", choices=("rlhf", "dpo"), help="rlhf: SFT -> reward -> RL (default); dpo: SFT -> DPO"
    )
    p.add_argument("--data-split", help="shares of steps 1,2,3, e.g. 2,4,4")
    p.add_argument(
        "--deployment-type", choices=("auto", "cpu", "single_gpu", "single_node", "multi_node"), help="preset"
    )
    p.add_argument("--actor-zero-stage", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--reward-zero-stage", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--step", nargs="+", metavar="N", help="steps to run (default: all)")
    p.add_argument(
        "--restart-from",
        type=int,
        metavar="N",
        help="delete step N and later steps of DIR, then run them anew",
    )
    p.add_argument("--output-dir", help="where everything goes")
    p.add_argument("--config", help="YAML file with pipeline settings")
    p.add_argument(
        "--help-config", action="store_true", help="list every config key, its default and meaning"
    )
    p.set_defaults(handler=run_train)

    d = sub.add_parser(
        "demo", help="the whole pipeline on a built-in tiny model and task (offline, CPU, minutes)"
    )
    d.add_argument("--output-dir", default="demo-output", help="where the demo writes (default: demo-output)")
    d.add_argument("--fresh", action="store_true", help="delete a previous demo output first")
    d.add_argument(
        "--algorithm",
        choices=("ppo", "grpo", "dr_grpo", "rloo", "reinforce++", "dpo"),
        default="ppo",
        help="step 3's algorithm (grpo/rloo/...: the task's rule reward, no reward model); dpo: SFT -> DPO",
    )
    d.set_defaults(handler=run_demo)


def split_overrides(args) -> None:
    """`key=value` typed after a multi-value flag (--data, --step) is an override, not a value of the flag."""
    from chatforge.config import ConfigError

    for name in ("data", "step"):
        values = getattr(args, name) or []
        kept = [v for v in values if not looks_like_override(v)]
        args.overrides += [v for v in values if looks_like_override(v)]
        setattr(args, name, kept or None)
    if args.step and not all(s.isdigit() for s in args.step):
        raise ConfigError(f"--step takes step numbers (e.g. --step 2 3), got {' '.join(args.step)}")
    if args.step:
        args.step = [int(s) for s in args.step]


def looks_like_override(text: str) -> bool:
    import os
    import re

    return bool(re.match(r"^[A-Za-z_][\w.-]*=", text)) and not os.path.exists(text)


def flag_overrides(args) -> list[str]:
    """Turn the named flags into config overrides (applied after --config)."""
    import json

    pairs = {
        "mode": args.mode,
        "actor_model": args.actor_model,
        "reward_model": args.reward_model,
        "data.datasets": json.dumps(args.data) if args.data else None,
        "data.data_split": f"[{args.data_split}]" if args.data_split else None,
        "deployment_type": args.deployment_type,
        "actor_zero_stage": args.actor_zero_stage,
        "reward_zero_stage": args.reward_zero_stage,
        "steps": json.dumps(args.step) if args.step else None,
        "output_dir": args.output_dir,
    }
    return [f"{k}={v}" for k, v in pairs.items() if v is not None]


def run_train(args) -> int:
    if args.help_config:
        from chatforge.config import format_help
        from chatforge.pipeline.config import PipelineConfig, hidden_keys

        print(format_help(PipelineConfig, hidden=hidden_keys()))
        return 0
    from chatforge.pipeline import load_pipeline_config, run_pipeline

    split_overrides(args)
    cfg, deployment = load_pipeline_config(args.config, [*args.overrides, *flag_overrides(args)])
    run_pipeline(cfg, deployment, restart_from=args.restart_from)  # errors: one line from the CLI boundary
    return 0


def run_demo(args) -> int:
    from chatforge.pipeline.demo import run_demo as demo

    return demo(args.output_dir, fresh=args.fresh, algorithm=args.algorithm)
