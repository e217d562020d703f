"""Step-3 speed: rollout tokens/s of the actor's inference mode vs transformers' `model.generate`, and the
wall-time split of a PPO iteration, measured in one run on the fixture model ("small" size).

    .venv/bin/python benchmarks/bench_ppo.py --batch-sizes 1,16,64 --new-tokens 32 --threads 1

Both generators sample (temperature 1, no top-k/top-p) exactly --new-tokens per row (EOS can not end a
row early), from the same left-padded prompts. Time is the best of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ppo-iterations", type=int, default=3)
    p.add_argument("--rollout-batch", type=int, default=16)
    return p.parse_args()


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompts(batch: int, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 25, (batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):
        ids[row, width - n :] = torch.randint(10, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def bench_generation(model_dir: Path, args) -> None:
    from chatforge.config.schema import GenerationConfig
    from chatforge.engine import ModelSpec, TrainEngine
    from chatforge.engine.hybrid import inference_mode
    from chatforge.generation import generate
    from chatforge.models.loading import LoadOptions, load_causal_lm

    actor = TrainEngine(
        lambda d: load_causal_lm(str(model_dir), LoadOptions(), d),
        ModelSpec(str(model_dir), precision="fp32", learning_rate=1e-5),
    )
    hf = load_causal_lm(str(model_dir), LoadOptions(), torch.float32).eval()
    vocab, pad = hf.config.vocab_size, hf.config.pad_token_id
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True)
    print(f"{'batch':>5} {'inference mode tok/s':>21} {'HF generate tok/s':>18} {'ratio':>6}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids, mask = prompts(batch, vocab, pad)

        def ours(ids=ids, mask=mask):
            with inference_mode(actor) as model:
                generate(model, ids, mask, cfg, eos_token_id=vocab + 1, pad_token_id=pad,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip

        def theirs(ids=ids, mask=mask):
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            pad_token_id=pad)  # fmt: skip

        tokens = batch * args.new_tokens
        t_ours, t_hf = best_time(ours, args.repeats), best_time(theirs, args.repeats)
        print(f"{batch:>5} {tokens / t_ours:>21.0f} {tokens / t_hf:>18.0f} {t_hf / t_ours:>5.2f}x")


def bench_ppo_iteration(root: Path, fixtures: dict, args) -> None:
    from chatforge.config import PPOConfig, from_dict
    from chatforge.data import PromptCollator, load_step_data
    from chatforge.fixtures import task_rows
    from chatforge.trainers.ppo import PPOTrainer, RLHFEngine

    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(400)))
    cfg = from_dict(PPOConfig, {
        "actor": {"name_or_path": str(fixtures["llama"])},
        "reward": {"models": [str(fixtures["reward-llama"])]},
        "engine": {"precision": "fp32"},
        "data": {"datasets": [str(data)], "data_split": [0, 0, 1]},
        "rollout": {"max_new_tokens": args.new_tokens, "batch_size": args.rollout_batch},
        "algorithm": {"num_minibatches": 2, "epochs": 1},
        "train": {"output_dir": str(root / "ppo"), "report_to": ["none"]},
    })  # fmt: skip
    trainer = PPOTrainer(RLHFEngine(cfg), cfg)
    rows = load_step_data(cfg.data, trainer.tokenizer, "ppo").train
    collate = PromptCollator(trainer.tokenizer)
    n = args.rollout_batch
    for it in range(args.ppo_iterations + 1):  # iteration 0 is a warm-up
        trainer.timings = dict.fromkeys(trainer.timings, 0.0)
        stats = trainer.train_rlhf(
            trainer.generate_experience(collate([rows[i] for i in range(it * n, it * n + n)]))
        )
        if it == 0:
            totals = dict.fromkeys(trainer.timings, 0.0)
            continue
        totals = {k: totals[k] + v for k, v in trainer.timings.items()}
    total = sum(totals.values())
    print(f"\nPPO iteration (rollout batch {n}, {args.new_tokens} new tokens max, mean of {args.ppo_iterations}; "
          f"last response length {stats['response_length']:.1f}):")  # fmt: skip
    for key, value in totals.items():
        mean = value / args.ppo_iterations
        print(f"  {key:<16} {mean:7.3f} s  {100 * value / total:5.1f}%")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache/torch_extensions")
    )
    from chatforge.fixtures import write_fixtures

    print(f"torch threads: {args.threads}; fixture llama 'small' (4 layers, hidden 128), fp32 CPU")
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = write_fixtures(Path(tmp) / "fx", families=("llama",), size="small")
        bench_generation(fixtures["llama"], args)
        bench_ppo_iteration(Path(tmp), fixtures, args)


if __name__ == "__main__":
    main()
