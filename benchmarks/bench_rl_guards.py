"""Does step 3 improve the model, or only the reward? Held-out task accuracy before and after RL, with the
over-optimisation guards on (the defaults) and off, on three reward models of the arithmetic fixture task:

  demo      chosen = the right answer, rejected = a wrong one (the demo's data: a good reward model)
  shortcut  the wrong answer is always SMALLER than the right one, so "a larger number is better" fits every
            pair: the reward model can be right on held-out pairs and still be a proxy a policy can hack
  noisy     the demo's pairs, but for 4 of the task's 40 problems (picked by a hash of "a op b") one fixed
            wrong answer is preferred to the right one, consistently: an imperfect reward model (about 90%
            right on clean held-out pairs) whose errors are not one simple shortcut

    .venv/bin/python benchmarks/bench_rl_guards.py --work /tmp/guards            # all runs, a markdown table
    .venv/bin/python benchmarks/bench_rl_guards.py --work /tmp/guards --runs demo:defaults,shortcut:none

Accuracy is measured on 200 held-out problems: greedy, and sampled (temperature 1, 4 samples per prompt).
The SFT model and the reward models are trained once per --work dir and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from pathlib import Path

MAX_OPERAND = 4
ROWS = 6000
EVAL_PROBLEMS, SAMPLES = 200, 4
SFT_SETTINGS = {
    "model": {"learning_rate": 3e-3},
    "optim": {"warmup": 0.05},
    "batch": {"micro_batch_size": 16, "epochs": 5},
}
RM_SETTINGS = {"model": {"learning_rate": 1e-3}, "batch": {"micro_batch_size": 16, "epochs": 4}}
# Budget and model-size settings only (the tiny model needs larger learning rates than the defaults, which
# are sized for 100M+ parameter models); everything else is chatforge's default.
BUDGET = {
    "actor": {"learning_rate": 3e-4},
    "critic": {"learning_rate": 5e-4},
    "rollout": {"batch_size": 32, "max_new_tokens": 12},
    "eval": {"prompts": 64},
    "train": {"max_steps": 120, "eval_every": 20},
}
# The first release's demo recipe, tuned to the demo's task.
RECIPE = {"kl_coef": 0.02, "lam": 1.0, "epochs": 4, "num_minibatches": 2}
OFF = {"kl_target": None, "kl_limit": None}
GOLD = {"eval": {"gold": ["chatforge.fixtures.task:is_correct"]}}
RECIPES = {
    "none": {"algorithm": {**RECIPE, **OFF}},  # the first release: a fixed KL coefficient, no budget, no gold
    "recipe+kl": {"algorithm": RECIPE},  # the default KL target and limit
    "recipe+kl+gold": {"algorithm": RECIPE, **GOLD},  # and the best checkpoint by the task check
    "defaults": {},
    "defaults+gold": GOLD,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="dir for fixtures, data, SFT/RM models and runs (reused)")
    p.add_argument(
        "--runs",
        default="demo:none,demo:defaults,shortcut:none,shortcut:defaults,noisy:none,noisy:defaults",
        help="task:recipe pairs; recipes: " + ", ".join(RECIPES),
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="step 3's train.seed (default: chatforge's)")
    return p.parse_args()


def misjudged_problems() -> dict[tuple, int]:
    """The noisy data's mistakes: (a, op, b) -> the wrong answer preferred to the right one, for 4 of the 40
    problems (picked by a hash of "a op b"), 1 or 2 away, up or down: no number or direction to latch onto."""
    keys = [(a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) for op in "+-"]
    keys = [k for k in keys if k[1] == "+" or k[0] >= k[2]]
    digest = {k: int(hashlib.sha256(f"{k[0]} {k[1]} {k[2]}".encode()).hexdigest(), 16) for k in keys}
    out = {}
    for k in sorted(keys, key=digest.get)[: len(keys) // 10]:
        right, h = k[0] + k[2] if k[1] == "+" else k[0] - k[2], digest[k] >> 8
        delta = (1 + h % 2) * (1 if h // 2 % 2 else -1)
        out[k] = right + delta if right + delta >= 0 else right - delta
    return out


def pair_rows(kind: str, seed: int = 0) -> list[dict]:
    """DS-Chat rows of the task with the preference pairs of `kind`."""
    from chatforge.fixtures.task import sample_problems

    rng = random.Random(seed + 1)
    misjudged = misjudged_problems() if kind == "noisy" else {}
    rows = []
    for p in sample_problems(ROWS, seed, max_operand=MAX_OPERAND):
        wrong = p.answer + (
            rng.choice([-3, -2, -1, 1, 2, 3]) if kind != "shortcut" else -rng.choice([1, 2, 3])
        )
        chosen, rejected = p.reply(), p.reply(wrong)
        if (p.a, p.op, p.b) in misjudged:
            chosen, rejected = p.reply(misjudged[(p.a, p.op, p.b)]), p.reply()
        prompt = f"\n\nHuman: {p.question}\n\nAssistant:"
        rows.append(
            {
                "prompt": prompt,
                "response": " " + p.reply(),
                "chosen": " " + chosen,
                "rejected": " " + rejected,
            }
        )
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_once(kind: str, cls_name: str, settings: dict, model: Path, data: Path, out: Path) -> Path:
    """Train an SFT or reward model unless `out/model` exists; returns the model dir."""
    import chatforge.config as c
    from chatforge.trainers.reward import RewardTrainer
    from chatforge.trainers.sft import SFTTrainer

    if (out / "DONE").is_file():
        return out / "model"
    cfg = c.from_dict(getattr(c, cls_name), {
        **settings, "model": {"name_or_path": str(model), **settings["model"]}, "engine": {"precision": "fp32"},
        "data": {"datasets": [str(data)]}, "train": {"output_dir": str(out), "report_to": ["none"]},
    })  # fmt: skip
    (SFTTrainer if cls_name == "SFTConfig" else RewardTrainer)(cfg).fit()
    return out / "model"


def true_pair_accuracy(rm_dir: Path, clean_data: Path) -> float:
    """Share of the demo's held-out pairs (right answer chosen) that a reward model ranks right."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatforge.data import PairCollator, load_step_data
    from chatforge.data.pipeline import DataSettings
    from chatforge.engine.forward import sequence_scores

    tok = AutoTokenizer.from_pretrained(rm_dir)
    rows = load_step_data(DataSettings.of(None, datasets=[str(clean_data)]), tok, "reward").eval
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    batch = PairCollator(tok)([rows[i] for i in range(len(rows))])
    import torch

    with torch.no_grad():
        chosen, rejected = sequence_scores(model, batch["input_ids"], batch["attention_mask"])[:, 0].chunk(2)
    return float((chosen > rejected).float().mean())


def accuracy(model_dir: Path) -> dict:
    from chatforge.fixtures.task import is_correct, sample_problems
    from chatforge.inference import ChatModel

    chat = ChatModel(str(model_dir))
    problems = sample_problems(EVAL_PROBLEMS, seed=10_007, max_operand=MAX_OPERAND)
    convs = [[{"role": "user", "content": p.question}] for p in problems]
    greedy = [c.text for c in chat.complete_batch(convs, max_new_tokens=12, temperature=0)]
    sampled = [
        c.text
        for s in range(SAMPLES)
        for c in chat.complete_batch(convs, max_new_tokens=12, temperature=1.0, seed=s)
    ]

    def right(replies):
        return sum(is_correct(p.question, r) for p, r in zip(problems * SAMPLES, replies)) / len(replies)  # noqa: E731

    return {"greedy": right(greedy), "sampled": right(sampled), "distinct_greedy": len(set(greedy))}


def run_rl(
    work: Path, task: str, recipe: str, sft: Path, rm: Path, data: Path, seed: int | None = None
) -> dict:
    import chatforge.config as c
    from chatforge.trainers.ppo import build_trainer
    from chatforge.trainers.run_dir import read_metrics

    out = work / "runs" / (f"{task}-{recipe}" + (f"-seed{seed}" if seed is not None else ""))
    if not (out / "DONE").is_file():
        settings = json.loads(json.dumps(BUDGET))
        for section, values in RECIPES[recipe].items():
            settings[section] = {**settings.get(section, {}), **values}
        cfg = c.from_dict(c.PPOConfig, {
            **settings, "actor": {"name_or_path": str(sft), **settings["actor"]}, "reward": {"models": [str(rm)]},
            "engine": {"precision": "fp32"}, "data": {"datasets": [str(data)]},
            "train": {**settings["train"], "output_dir": str(out), "report_to": ["none"],
                      **({"seed": seed} if seed is not None else {})},
        })  # fmt: skip
        start = time.time()
        build_trainer(cfg).fit()
        (out / "seconds").write_text(f"{time.time() - start:.0f}")
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    evals = [r for r in records if r["phase"] == "eval"]
    guard = [r for r in records if r["phase"] == "guard"]
    exported = [r["exported_step"] for r in guard if "exported_step" in r]
    return {
        "final": accuracy(out / "actor"), "kl_last": train[-1]["kl"], "reward_last": train[-1]["reward"],
        "iterations": train[-1]["step"], "warnings": sum(r.get("warnings", 0) for r in evals),
        "kl_stop": any("kl_limit_stop" in r for r in guard), "seconds": int((out / "seconds").read_text()),
        "exported": int(exported[-1]) if exported else train[-1]["step"], "evals": evals,
    }  # fmt: skip


def trajectory(evals: list[dict]) -> str:
    """One line per evaluation: held-out sampled reward, KL, reference drift and the task check if scored."""
    lines = []
    for r in evals:
        gold = r.get("gold:chatforge.fixtures.task:is_correct_sampled")
        lines.append(
            f"    it {r['step']:4d}  reward {r['reward_sampled']:+.3f}  KL {r['kl_sampled']:.2f}  "
            f"drift {r.get('ref_drift', 0.0):+.3f}" + (f"  task {gold:.1%}" if gold is not None else "")
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache/torch_extensions")
    )
    from chatforge.fixtures import write_fixtures

    work = Path(args.work)
    fixtures = work / "fixtures"
    if not (fixtures / "llama" / "config.json").is_file():
        write_fixtures(fixtures, families=("llama",))
    data = {k: write_rows(work / "data" / f"{k}.jsonl", pair_rows(k)) for k in ("demo", "shortcut", "noisy")}
    sft = train_once("sft", "SFTConfig", SFT_SETTINGS, fixtures / "llama", data["demo"], work / "sft")
    rms = {k: train_once(k, "RewardConfig", RM_SETTINGS, sft, data[k], work / f"rm-{k}") for k in data}
    base = accuracy(sft)
    print(
        f"SFT: greedy {base['greedy']:.1%} sampled {base['sampled']:.1%} distinct greedy {base['distinct_greedy']}"
    )
    rows = []
    for spec in filter(None, args.runs.split(",")):
        task, recipe = spec.split(":")
        rm_acc = true_pair_accuracy(rms[task], data["demo"])
        result = run_rl(work, task, recipe, sft, rms[task], data[task], args.seed)
        rows.append((task, recipe, rm_acc, result))
        f = result["final"]
        print(f"{task:9s} {recipe:18s} RM {rm_acc:.1%} -> greedy {f['greedy']:.1%} sampled {f['sampled']:.1%} "
              f"distinct {f['distinct_greedy']} KL {result['kl_last']:.2f} warnings {result['warnings']:.0f} "
              f"stop {result['kl_stop']} exported it {result['exported']} ({result['seconds']} s)\n"
              f"{trajectory(result['evals'])}", flush=True)  # fmt: skip
    print(
        "\n| reward model | held-out pair acc. | guards | greedy acc. | sampled acc. | distinct greedy replies | KL (nats) | warnings | exported iteration |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| (SFT model) | | | {base['greedy']:.1%} | {base['sampled']:.1%} | {base['distinct_greedy']} | 0 | | |"
    )
    for task, recipe, rm_acc, r in rows:
        f = r["final"]
        print(f"| {task} | {rm_acc:.1%} | {recipe} | {f['greedy']:.1%} | {f['sampled']:.1%} | {f['distinct_greedy']} | "
              f"{r['kl_last']:.2f}{' (stopped)' if r['kl_stop'] else ''} | {r['warnings']:.0f} | "
              f"{r['exported']} of {r['iterations']} |")  # fmt: skip


if __name__ == "__main__":
    main()
