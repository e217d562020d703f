"""Speed of the three steps on one box, measured in one run: PPO samples/s with the generation / scoring /
training split, generation tokens/s against transformers' `model.generate`, SFT and reward-model tokens/s,
and MFU against the matmul peak measured in the same run; for fp32 and for the precision `auto` picks here.

    .venv/bin/python benchmarks/bench_speed.py                      # small and large OPT, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_speed.py --sizes small --repeats 2
    git worktree add /tmp/base e02a44f        # the first release, to measure before/after
    .venv/bin/python benchmarks/bench_speed.py --baseline /tmp/base --precisions fp32

The workload is ../shared/bench-peers' (the one chatforge is compared with TRL on): OPT models of 4.0M
(hidden 128, 4 layers) and 31.8M parameters (hidden 512, 6 layers), vocabulary 24,576, PPO rollouts of 16
prompts x 48 forced tokens sampled at T=1, one epoch of one mini-batch, fp32, 1 thread; SFT and reward
batches of 16 rows (pairs) of 128 tokens. Each measurement runs in its own process, configurations
interleaved; medians over --repeats. FLOPs: forward 2 x (non-embedding params + V x h) per token for a
causal LM, training 3 x forward (the bench-peers convention). With --baseline, every measurement also runs
on that checkout's src/ (fp32; the first release's config layout is recognised) right after ours, and the
table gives after/before as the median of the per-repeat ratios of adjacent runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SIZES = {"small": (128, 4, 512), "large": (512, 6, 2048)}
VOCAB, BATCH, NEW_TOKENS, SEQ = 24_576, 16, 48, 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--precisions", default="fp32,auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations (the first is a warm-up)")
    p.add_argument("--steps", type=int, default=6, help="SFT / reward steps (the first 2 are warm-up)")
    p.add_argument("--work", default=None)
    p.add_argument(
        "--baseline", default=None, help="a checkout of an earlier chatforge to compare with (fp32)"
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: "<kind>:<size>:<precision>"
    return p.parse_args()


def write_models(root: Path, size: str) -> Path:
    """policy/ and reward/ OPT dirs of `size` with the fixture tokenizer (ids above 512 are never fed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig

    from chatforge.fixtures import build_tokenizer

    out = root / size
    if (out / "reward" / "config.json").is_file():
        return out
    hidden, layers, ffn = SIZES[size]
    tok = build_tokenizer()
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=8,
        word_embed_proj_dim=hidden, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0,
    )  # fmt: skip
    for kind, auto in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        torch.manual_seed(0)
        config.num_labels = 1
        auto.from_config(config).save_pretrained(out / kind)
        tok.save_pretrained(out / kind)
    return out


def matmul_peak() -> float:
    """Best fp32 GFLOP/s of a 2048^3 matmul on one thread."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def flops_per_token(model_dir: Path, causal: bool) -> float:
    import json as js

    c = js.loads((model_dir / "config.json").read_text())
    h, layers, ffn = c["hidden_size"], c["num_hidden_layers"], c["ffn_dim"]
    block = layers * (4 * h * h + 2 * h * ffn)
    return 2 * (block + (VOCAB * h if causal else 0))


def first_release() -> bool:
    """True when the chatforge imported is the first release (its config layout: actor_engine, ppo, ...)."""
    import dataclasses

    from chatforge.config import PPOConfig

    return "actor_engine" in {f.name for f in dataclasses.fields(PPOConfig)}


def first_release_ppo(models: Path, iterations: int, work: Path):
    """The same PPO workload in the first release's config layout; 48 tokens forced as bench-peers does."""
    import importlib

    import chatforge.trainers.ppo as ppo_mod
    from chatforge.config import PPOConfig, from_dict
    from chatforge.trainers.ppo import PPOTrainer

    RLHFEngine = importlib.import_module("chatforge.trainers.rlhf_engine").RLHFEngine  # gone since

    engines = {
        k: {"precision": "fp32", "zero_stage": 0}
        for k in ("actor_engine", "critic_engine", "ref_engine", "reward_engine")
    }
    cfg = from_dict(PPOConfig, {
        "actor": {"name_or_path": str(models / "policy")}, "reward": {"name_or_path": str(models / "reward")}, **engines,
        "actor_optim": {"learning_rate": 1e-5, "lr_scheduler": "constant"},
        "critic_optim": {"learning_rate": 5e-5, "lr_scheduler": "constant"},
        "generation": {"max_new_tokens": NEW_TOKENS, "do_sample": True},
        "ppo": {"num_minibatches": 1, "ppo_epochs": 1, "kl_coef": 0.05},
        "train": {"output_dir": str(work / "ppo"), "rollout_batch_size": BATCH, "max_steps": iterations, "tensorboard": False},
    })  # fmt: skip
    sample = ppo_mod.generate
    ppo_mod.generate = lambda *a, **kw: sample(*a, **{**kw, "eos_token_id": -1})
    return PPOTrainer(RLHFEngine(cfg), cfg)


def ppo_child(models: Path, precision: str, iterations: int, work: Path) -> dict:
    import torch

    import chatforge.config as c

    if first_release():
        trainer = first_release_ppo(models, iterations, work)
    else:
        cfg = c.from_dict(c.PPOConfig, {
            "actor": {"name_or_path": str(models / "policy"), "learning_rate": 1e-5}, "critic": {"learning_rate": 5e-5},
            "reward": {"models": [str(models / "reward")]}, "engine": {"precision": precision},
            "optim": {"lr_scheduler": "constant"}, "rollout": {"batch_size": BATCH, "max_new_tokens": NEW_TOKENS},
            "algorithm": {"epochs": 1, "num_minibatches": 1, "kl_coef": 0.05, "kl_target": None, "kl_limit": None},
            "train": {"output_dir": str(work / "ppo"), "max_steps": iterations, "report_to": ["none"]},
        })  # fmt: skip
        from chatforge.trainers.ppo import PPOTrainer, RLHFEngine

        trainer = PPOTrainer(RLHFEngine(cfg), cfg)
        trainer.backend.eos_token_id = -1  # every response is exactly NEW_TOKENS long
    gen = torch.Generator().manual_seed(0)
    times, splits = [], []
    for it in range(iterations):
        ids = torch.randint(600, VOCAB, (BATCH, 24), generator=gen)
        before = dict(trainer.timings)
        start = time.perf_counter()
        trainer.train_rlhf(
            trainer.generate_experience({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        )
        if it:
            times.append(time.perf_counter() - start)
            splits.append({k: trainer.timings[k] - before[k] for k in before})
    tokens = BATCH * (24 + NEW_TOKENS)
    train_flops = (
        3 * flops_per_token(models / "policy", True) * tokens
        + 3 * flops_per_token(models / "reward", False) * tokens
    )
    train_s = statistics.median(s["time_training"] for s in splits)
    return {
        "samples_per_s": BATCH / statistics.median(times),
        **{k: statistics.median(s[k] for s in splits) for k in splits[0]},
        "train_gflops": train_flops / train_s / 1e9,
    }


def step12_child(kind: str, models: Path, precision: str, steps: int, work: Path) -> dict:
    import torch

    import chatforge.config as c
    from chatforge.fixtures import task_rows
    from chatforge.trainers.reward import RewardTrainer
    from chatforge.trainers.sft import SFTTrainer

    data = work / "rows.jsonl"
    rows = task_rows(800, seed=1, max_operand=99)
    data.write_text("".join(json.dumps({**r, "prompt": r["prompt"] * 8}) + "\n" for r in rows))  # ~128 tokens
    model = str(models / ("policy" if kind == "sft" else "reward"))
    data_cfg = {"datasets": [str(data)], "data_split": [1, 0, 0] if kind == "sft" else [0, 1, 0],
                "eval_fraction": 0.01, "max_length": SEQ, "max_prompt_length": 96}  # fmt: skip
    if first_release():
        settings = {
            "model": {"name_or_path": model}, "data": data_cfg, "engine": {"precision": "fp32", "zero_stage": 0},
            "optim": {"learning_rate": 1e-5, "lr_scheduler": "constant"},
            "train": {"output_dir": str(work / kind), "micro_batch_size": BATCH, "max_steps": steps, "tensorboard": False},
        }  # fmt: skip
    else:
        settings = {
            "model": {"name_or_path": model, "learning_rate": 1e-5}, "data": data_cfg,
            "engine": {"precision": precision}, "optim": {"lr_scheduler": "constant"}, "batch": {"micro_batch_size": BATCH},
            "train": {"output_dir": str(work / kind), "max_steps": steps, "report_to": ["none"]},
        }  # fmt: skip
    cfg = c.from_dict(c.SFTConfig if kind == "sft" else c.RewardConfig, settings)
    trainer = (SFTTrainer if kind == "sft" else RewardTrainer)(cfg)
    inner, marks = trainer._train_step, []

    def timed(window):
        start = time.perf_counter()
        out = inner(window)
        marks.append((time.perf_counter() - start, sum(int(b["attention_mask"].sum()) for b in window)))
        return out

    trainer._train_step = timed
    trainer.fit()
    steady = marks[2:]
    tokens_per_s = sum(t for _, t in steady) / sum(s for s, _ in steady)
    per_token = flops_per_token(models / ("policy" if kind == "sft" else "reward"), kind == "sft")
    return {
        "tokens_per_s": tokens_per_s,
        "train_gflops": 3 * per_token * tokens_per_s / 1e9,
        "_": torch.__version__,
    }


def gen_child(models: Path, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.config.schema import GenerationConfig
    from chatforge.engine.ds_config import torch_dtype
    from chatforge.generation import generate

    model = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch_dtype(precision)).eval()
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True)
    out = {}
    for batch in (1, 16, 64):
        ids = torch.randint(600, VOCAB, (batch, 24), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        ratios = []
        for _ in range(3):
            start = time.perf_counter()
            generate(
                model,
                ids,
                mask,
                cfg,
                eos_token_id=-1,
                pad_token_id=0,
                generator=torch.Generator().manual_seed(0),
            )
            ours = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
            ratios.append((time.perf_counter() - start) / ours)
        out[f"gen_b{batch}_ratio_vs_hf"] = statistics.median(ratios)
        out[f"gen_b{batch}_tokens_per_s"] = batch * NEW_TOKENS / ours
    return out


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    kind, size, precision = args.one.split(":")
    work = Path(args.work)
    models = write_models(work / "models", size)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        if kind == "ppo":
            result = ppo_child(models, precision, args.iterations, Path(tmp))
        elif kind == "gen":
            result = gen_child(models, precision)
        else:
            result = step12_child(kind, models, precision, args.steps, Path(tmp))
    result["peak_gflops"] = matmul_peak()
    print("RESULT " + json.dumps(result), flush=True)


def run_job(job: str, args, work: Path) -> dict:
    """One measurement in a fresh process; a baseline job ("kind:size:before") imports --baseline's src/."""
    env = dict(os.environ)
    if job.endswith(":before"):
        env["PYTHONPATH"] = str(Path(args.baseline).resolve() / "src")
        job = job[: -len("before")] + "fp32"
    cmd = [sys.executable, str(HERE), "--one", job, "--work", str(work), "--iterations", str(args.iterations),
           "--steps", str(args.steps)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{job} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def speedup(key: str, after: dict, before: dict) -> float:
    """after/before as a speed: times (time_*) invert."""
    return before[key] / after[key] if key.startswith("time_") else after[key] / before[key]


def print_table(results: dict[str, list[dict]]) -> None:
    print("\n| measurement | size | precision | median | MFU (vs 1-thread fp32 matmul peak) | after/before |")
    print("|---|---|---|---|---|---|")
    for job, runs in results.items():
        kind, size, precision = job.split(":")
        if precision == "before":
            continue
        base = results.get(f"{kind}:{size}:before") if precision == "fp32" else None
        peak = statistics.median(r["peak_gflops"] for r in runs)
        for key in sorted(runs[0]):
            if key in ("peak_gflops", "_"):
                continue
            value = statistics.median(r[key] for r in runs)
            mfu = f"{value / peak:.1%}" if key == "train_gflops" else ""
            ratio = ""
            if base and key in base[0]:  # per repeat, adjacent runs
                ratios = [speedup(key, a, b) for a, b in zip(runs, base)]
                ratio = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"| {kind} {key} | {size} | {precision} | {value:.4g} | {mfu} | {ratio} |")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(HERE.parents[1] / ".cache/torch_extensions"))
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.one:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-speed-"))
    from chatforge.engine.ds_config import resolve_precision

    precisions = args.precisions.split(",") + (["before"] if args.baseline else [])
    print(f"precision auto = {resolve_precision('auto')} on this box; work dir {work}")
    jobs = [
        f"{k}:{s}:{p}"
        for s in args.sizes.split(",")
        for k in ("ppo", "gen", "sft", "reward")
        for p in precisions
    ]
    results: dict[str, list[dict]] = {j: [] for j in jobs}
    for _ in range(args.repeats):  # interleaved: every configuration once per repeat
        for job in jobs:
            results[job].append(run_job(job, args, work))
    print_table(results)


if __name__ == "__main__":
    main()
