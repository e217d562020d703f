"""PPO, GRPO, Dr. GRPO, RLOO and REINFORCE++ on the same budget: held-out task accuracy reached, wall time
per iteration and peak memory, each run in its own process (so peak RSS is its own).

    .venv/bin/python benchmarks/bench_rl_algorithms.py --work /tmp/algos
    .venv/bin/python benchmarks/bench_rl_algorithms.py --work /tmp/algos --algorithms grpo,rloo --iterations 60

The SFT model of benchmarks/bench_rl_guards.py (the demo's recipe) starts every run; the reward is the task's
rule `chatforge.fixtures.task:is_correct` (no reward model); PPO also runs with the demo's reward model. Every
run samples the same number of responses per iteration (32: PPO and REINFORCE++ 32 prompts x 1, the group
methods 8 prompts x 4) and otherwise uses chatforge's defaults (learning rates sized for the tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RUNS = {
    "ppo (reward model)": {"algorithm": {"name": "ppo"}, "reward": "rm"},
    "ppo (rule)": {"algorithm": {"name": "ppo"}, "reward": "rule"},
    "grpo": {"algorithm": {"name": "grpo"}, "reward": "rule", "group": 4},
    "dr_grpo": {"algorithm": {"name": "dr_grpo"}, "reward": "rule", "group": 4},
    "rloo": {"algorithm": {"name": "rloo"}, "reward": "rule", "group": 4},
    "reinforce++": {"algorithm": {"name": "reinforce++"}, "reward": "rule"},
}
RESPONSES_PER_ITERATION = 32


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", required=True, help="dir of the SFT model and the runs (bench_rl_guards' layout)"
    )
    p.add_argument("--algorithms", default=",".join(RUNS))
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: one run
    return p.parse_args()


def child(args) -> None:
    """One run in this process; writes its result JSON (accuracy, seconds per iteration, peak RSS)."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE.parent))
    from bench_rl_guards import accuracy

    import chatforge.config as c
    from chatforge.trainers.ppo import build_trainer

    work, name = Path(args.work), args.one
    spec = RUNS[name]
    group = spec.get("group", 1)
    out = work / "algos" / name.replace(" ", "_").replace("(", "").replace(")", "")
    reward = {"models": [str(work / "rm-demo" / "model")]} if spec["reward"] == "rm" else {
        "functions": ["chatforge.fixtures.task:is_correct"]
    }  # fmt: skip
    cfg = c.from_dict(c.PPOConfig, {
        "actor": {"name_or_path": str(work / "sft" / "model"), "learning_rate": 3e-4},
        "critic": {"learning_rate": 5e-4}, "reward": reward, "algorithm": spec["algorithm"],
        "rollout": {"batch_size": RESPONSES_PER_ITERATION // group, "n_samples_per_prompt": group, "max_new_tokens": 12},
        "engine": {"precision": "fp32"}, "data": {"datasets": [str(work / "data" / "demo.jsonl")]},
        "eval": {"prompts": 64, "samples": 2},
        "train": {"output_dir": str(out), "max_steps": args.iterations, "eval_every": 20, "report_to": ["none"]},
    })  # fmt: skip
    trainer = build_trainer(cfg)
    start = time.time()
    trainer.fit()
    seconds = time.time() - start
    result = {
        **accuracy(out / "actor"), "seconds_per_iteration": seconds / args.iterations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "models": 2 + (trainer.engine.critic is not None) + len(trainer.engine.reward_models),
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(HERE.parents[1] / ".cache/torch_extensions"))
    if args.one:
        child(args)
        return
    sys.path.insert(0, str(HERE.parent))
    from bench_rl_guards import accuracy

    work = Path(args.work)
    if not (work / "sft" / "DONE").is_file():
        subprocess.run(
            [sys.executable, str(HERE.parent / "bench_rl_guards.py"), "--work", str(work), "--runs", ""],
            check=True,
        )
    base = accuracy(work / "sft" / "model")
    rows = []
    for name in args.algorithms.split(","):
        cmd = [
            sys.executable,
            str(HERE),
            "--work",
            str(work),
            "--one",
            name,
            "--iterations",
            str(args.iterations),
        ]
        subprocess.run([*cmd, "--threads", str(args.threads)], check=True, capture_output=True)
        out = work / "algos" / name.replace(" ", "_").replace("(", "").replace(")", "")
        rows.append((name, json.loads((out / "result.json").read_text())))
        print(name, rows[-1][1], flush=True)
    print(
        f"\n{args.iterations} iterations x {RESPONSES_PER_ITERATION} responses, fp32, {args.threads} thread(s)\n"
    )
    print("| algorithm | models held | greedy acc. | sampled acc. | s / iteration | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    print(f"| (SFT model) | | {base['greedy']:.1%} | {base['sampled']:.1%} | | |")
    for name, r in rows:
        print(f"| {name} | {r['models']} | {r['greedy']:.1%} | {r['sampled']:.1%} | {r['seconds_per_iteration']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
