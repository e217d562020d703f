"""`chatforge demo`: the whole pipeline, offline, on a tiny Llama and a task whose answers can be checked.

It builds the fixture tokenizer and model, writes a synthetic arithmetic dataset, runs `chatforge train`'s
own code path with small budgets, then compares the SFT model and the RLHF model on held-out problems.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# Operands 0..4: a table the tiny model learns partly in a few CPU-minutes, leaving room for PPO.
MAX_OPERAND = 4
DEMO_ROWS = 6000
EVAL_PROBLEMS = 200

# The demo's budget, as the overrides a user would type after `chatforge train`.
DEMO_SETTINGS = [
    "deployment_type=cpu",
    "reward_model=sft",
    "data.eval_fraction=0.05",
    "sft.batch.micro_batch_size=16",
    "sft.batch.epochs=5",
    "sft.model.learning_rate=3e-3",
    "sft.optim.warmup=0.05",
    "sft.train.eval_every=50",
    "reward.batch.micro_batch_size=16",
    "reward.batch.epochs=4",
    "reward.model.learning_rate=1e-3",
    "reward.train.eval_every=50",
    "ppo.train.max_steps=120",
    "ppo.rollout.batch_size=32",
    "ppo.rollout.max_new_tokens=12",
    "ppo.eval.prompts=64",
    "ppo.train.eval_every=20",
    # The defaults are sized for 100M+ parameter models; this 300k-parameter one learns at larger rates.
    "ppo.actor.learning_rate=3e-4",
    "ppo.critic.learning_rate=5e-4",
    # A trusted check: evaluations report its score and the best checkpoint by it is exported.
    "ppo.eval.gold=[chatforge.fixtures.task:is_correct]",
]
# Critic-free estimators on the task's rule reward: no reward model, so no step 2.
RULE_SETTINGS = [
    "reward_model=none",
    "ppo.reward.functions=[chatforge.fixtures.task:is_correct]",
    "ppo.rollout.batch_size=8",
    "ppo.rollout.n_samples_per_prompt=4",
]
DPO_SETTINGS = [
    "mode=dpo",
    "dpo.batch.micro_batch_size=16",
    "dpo.batch.epochs=2",
    "dpo.policy.learning_rate=5e-4",
    "dpo.dpo.sft_coef=1.0",
]


def demo_settings(algorithm: str) -> list[str]:
    """The overrides of `chatforge demo --algorithm NAME`."""
    if algorithm == "dpo":
        return [
            s for s in DEMO_SETTINGS if not s.startswith(("ppo.", "reward.", "reward_model"))
        ] + DPO_SETTINGS
    if algorithm == "ppo":
        return list(DEMO_SETTINGS)
    keep = [
        s
        for s in DEMO_SETTINGS
        if not s.startswith(("reward.", "reward_model", "ppo.critic", "ppo.rollout.batch_size"))
    ]
    return keep + RULE_SETTINGS + [f"ppo.algorithm.name={algorithm}"]


def prepare(out: Path) -> tuple[Path, Path]:
    """Fixture model dir and task data file (both reused when present)."""
    from chatforge.fixtures import task_rows, write_fixtures

    model = out / "fixtures" / "llama"
    if not (model / "config.json").is_file():
        write_fixtures(out / "fixtures", families=("llama",))
    data = out / "data" / "task.jsonl"
    if not data.is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in task_rows(DEMO_ROWS, seed=0, max_operand=MAX_OPERAND))
        )
        tmp.rename(data)
    return model, data


def evaluate(model_dir: Path, seed: int = 7) -> dict:
    """Task accuracy of a chat model on held-out problems: greedy, and sampled at temperature 1 (the
    policy PPO optimises); plus three example conversations."""
    from chatforge.fixtures.task import is_correct, sample_problems
    from chatforge.inference import ChatModel

    chat = ChatModel(str(model_dir))
    problems = sample_problems(EVAL_PROBLEMS, seed=10_000 + seed, max_operand=MAX_OPERAND)
    convs = [[{"role": "user", "content": p.question}] for p in problems]
    result = {}
    for name, gen in (("greedy", {"temperature": 0}), ("sampled", {"temperature": 1.0, "seed": seed})):
        replies = [c.text for c in chat.complete_batch(convs, max_new_tokens=12, **gen)]
        result[f"accuracy_{name}"] = sum(is_correct(p.question, r) for p, r in zip(problems, replies)) / len(
            problems
        )
        result[f"examples_{name}"] = [(p.question, r) for p, r in zip(problems, replies)]
    return result


def print_side_by_side(sft: dict, rlhf: dict, shown: int = 3) -> None:
    """Conversations where the two models answer differently (greedy), then the accuracy table."""
    from chatforge.fixtures.task import is_correct

    pairs = [(q, a, b) for (q, a), (_, b) in zip(sft["examples_greedy"], rlhf["examples_greedy"]) if a != b]
    print(
        f"\n=== conversations where SFT and the final model differ (greedy; {len(pairs)} of {EVAL_PROBLEMS}) ==="
    )
    for q, a_sft, a_rl in pairs[:shown]:
        mark = lambda a, q=q: "right" if is_correct(q, a) else "wrong"  # noqa: E731
        print(f"user:        {q}\n  SFT:       {a_sft}  ({mark(a_sft)})\n  final:     {a_rl}  ({mark(a_rl)})")
    print("\n=== task accuracy on held-out problems ===")
    print(f"{'':10s}{'SFT':>10s}{'final':>10s}")
    for kind in ("greedy", "sampled"):
        print(f"{kind:10s}{sft[f'accuracy_{kind}']:>10.1%}{rlhf[f'accuracy_{kind}']:>10.1%}")


def run_demo(output_dir: str = "demo-output", fresh: bool = False, algorithm: str = "ppo") -> int:
    from chatforge.pipeline import load_pipeline_config, run_pipeline
    from chatforge.report import build_report

    out = Path(output_dir)
    if fresh and out.exists():
        shutil.rmtree(out)
    start = time.time()
    model, data = prepare(out)
    overrides = [
        *demo_settings(algorithm),
        f"actor_model={model}",
        f"data.datasets=[{data}]",
        f"output_dir={out}",
    ]
    cfg, deployment = load_pipeline_config(None, overrides)
    cfg.report = False  # written below, with the demo summary in it
    layout = run_pipeline(cfg, deployment)
    final = layout.output(max(layout.names))
    sft, rlhf = evaluate(layout.actor_sft), evaluate(final)
    print_side_by_side(sft, rlhf)
    summary = {
        "task": f"arithmetic, operands 0..{MAX_OPERAND}, {EVAL_PROBLEMS} held-out problems",
        "algorithm": algorithm,
        "sft": {k: v for k, v in sft.items() if k.startswith("accuracy")},
        "rlhf": {k: v for k, v in rlhf.items() if k.startswith("accuracy")},
        "minutes": round((time.time() - start) / 60, 2),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    report = build_report(out)
    models = [p for p in (layout.actor_sft, layout.reward, final, Path(f"{final}-ema")) if p.is_dir()]
    print(f"\nmodels: {'  '.join(map(str, models))}")
    print(f"report: {report}\nchat:   chatforge chat --model {final}")
    print(f"total:  {summary['minutes']} min")
    return 0
