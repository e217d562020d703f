"""Tokens/s of chatforge.generation.generate vs transformers' model.generate, measured in one run.

    .venv/bin/python benchmarks/bench_generation.py --family llama --batch-sizes 1,16,64 --new-tokens 64

Both decode greedily from the same left-padded random prompts on the same fixture model ("small" size),
so they produce the same tokens (checked and printed). Time is the best of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="llama", choices=["llama", "opt", "gpt2", "qwen2"])
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens per row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_prompts(batch: int, vocab: int, pad_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded random prompts of 8..32 tokens (ids above the special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (batch,), generator=gen)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, width - n :] = torch.randint(10, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.config.schema import GenerationConfig
    from chatforge.fixtures import write_fixtures
    from chatforge.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_fixtures(tmp, families=(args.family,), size="small")
        tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
        model = AutoModelForCausalLM.from_pretrained(str(paths[args.family])).eval()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"family={args.family} size=small params={params / 1e6:.2f}M torch_threads={torch.get_num_threads()}"
    )
    print(
        f"greedy, max_new_tokens={args.new_tokens}, best of {args.repeats} after 1 warm-up, torch {torch.__version__}"
    )
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'same tokens':>11}")
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids, mask = make_prompts(batch, len(tok), pad, args.seed)

        def ours(ids=ids, mask=mask) -> torch.Tensor:
            return generate(model, ids, mask, config, eos_token_id=eos, pad_token_id=pad).sequences

        def hf(ids=ids, mask=mask) -> torch.Tensor:
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=args.new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )

        t_ours, seq_ours = best_time(ours, args.repeats)
        t_hf, seq_hf = best_time(hf, args.repeats)
        # Decoded positions (B x A): both loops step every row until all stop, so the work is the same.
        n_tokens = batch * (seq_ours.shape[1] - ids.shape[1])
        same = torch.equal(seq_ours, seq_hf)
        ours_tps, hf_tps = n_tokens / t_ours, n_tokens / t_hf
        print(f"{batch:>5} {ours_tps:>11.1f} {hf_tps:>10.1f} {ours_tps / hf_tps:>5.2f}x {same!s:>11}")


if __name__ == "__main__":
    main()
