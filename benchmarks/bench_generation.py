"""Tokens/s of chatforge.generation.generate vs transformers' model.generate, measured in one interleaved run.

    .venv/bin/python benchmarks/bench_generation.py --family opt --batch-sizes 1,16,64 --repeats 5

The model is a seeded fixture-family model of the "small" size (hidden 128, 4 layers) with a --vocab
sized vocabulary (default 24576, as the side-by-side benchmark's small OPT), fp32, eval, --threads torch
threads. Prompts are random ids, 8..32 tokens, left padded. Three workloads:

  sample  sampling T=1, top_k 0, top_p 1, exactly --new-tokens tokens (ours: an EOS id that never
          occurs; HF: min_new_tokens = max_new_tokens). tokens/s = B * new_tokens / call time.
  greedy  the same, greedy; both must produce identical tokens (printed as a check).
  varied  sampling with natural stops: the EOS logit gets a bias so P(EOS) ~ 1/--mean-length per step
          (rows stop at geometric, varied lengths, capped at --max-varied). tokens/s counts generated
          tokens up to each row's EOS. Ours runs with compaction (default) and without it (`nocompact`).

Calls alternate (ours, HF, ours, HF, ...) after one warm-up each; every ratio is taken between calls that
sat next to each other in time, and the median [min-max] over --repeats is printed. On a shared box trust
the ratios, not the absolute rates; --clock cpu times this process's CPU time, which waiting for a
core shared with other jobs does not inflate.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="opt", choices=["llama", "opt", "gpt2", "qwen2"])
    parser.add_argument("--vocab", type=int, default=24576, help="vocabulary size of the benchmark model")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument(
        "--workloads", default="sample,greedy,varied", help="comma-separated: sample,greedy,varied"
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="forced response length (sample, greedy)")
    parser.add_argument("--mean-length", type=float, default=16.0, help="varied: mean response length")
    parser.add_argument("--max-varied", type=int, default=64, help="varied: max_new_tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed pairs per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared box, 1 thread)",
    )
    return parser.parse_args()


PAD, BOS, EOS = 0, 1, 2


def build_model(family: str, vocab: int, seed: int):
    from transformers import AutoModelForCausalLM

    from chatforge.fixtures import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(family, vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS, size="small")
    return AutoModelForCausalLM.from_config(config).float().eval()


def with_eos_bias(model, bias: float) -> None:
    """Give the LM head a bias that adds `bias` to the EOS logit only (the weight stays shared)."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[EOS] = bias
    model.set_output_embeddings(biased)


def make_prompts(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded random prompts of 8..32 tokens (ids above the special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (batch,), generator=gen)
    width = int(lengths.max())
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, width - n :] = torch.randint(10, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def response_tokens(sequences: torch.Tensor, prompt_len: int, eos: int) -> int:
    """Generated tokens up to and including each row's first EOS (HF pads after it)."""
    response = sequences[:, prompt_len:]
    is_eos = response == eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def interleaved(
    calls: dict[str, Callable[[], int]], repeats: int, clock: Callable[[], float]
) -> dict[str, list[tuple[float, int]]]:
    """Run each call once to warm up, then `repeats` rounds in order; (seconds, tokens) per call."""
    for fn in calls.values():
        fn()
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = clock()
            tokens = fn()
            results[name].append((clock() - start, tokens))
    return results


def summary(results: dict[str, list[tuple[float, int]]], name: str, base: str = "hf") -> str:
    """`tok/s` of `name` and its speed ratio over `base`, pair by pair: median [min-max]."""
    rates = [n / t for t, n in results[name]]
    ratios = [(n / t) / (nb / tb) for (t, n), (tb, nb) in zip(results[name], results[base])]
    return (
        f"{statistics.median(rates):9.1f} tok/s  x{statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}-{max(ratios):.2f}]"
    )


def forced_calls(model, ids, mask, new_tokens: int, sample: bool) -> dict[str, Callable[[], int]]:
    from chatforge.config.schema import GenerationConfig
    from chatforge.generation import generate

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=sample, temperature=1.0, top_k=0, top_p=1.0
    )
    outputs: dict[str, torch.Tensor] = {}

    def ours() -> int:
        gen = torch.Generator().manual_seed(0)
        out = generate(model, ids, mask, config, eos_token_id=-1, pad_token_id=PAD, generator=gen)
        outputs["ours"] = out.sequences
        return ids.shape[0] * (out.sequences.shape[1] - ids.shape[1])

    def hf() -> int:
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=sample, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=EOS,
            )  # fmt: skip
        outputs["hf"] = seq
        return ids.shape[0] * (seq.shape[1] - ids.shape[1])

    return {"ours": ours, "hf": hf}, outputs


def varied_calls(model, ids, mask, max_new: int) -> dict[str, Callable[[], int]]:
    from chatforge.config.schema import GenerationConfig
    from chatforge.generation import generate

    config = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    prompt_len = ids.shape[1]

    def ours(threshold: float) -> Callable[[], int]:
        def call() -> int:
            gen = torch.Generator().manual_seed(0)
            out = generate(
                model, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD, generator=gen,
                compact_threshold=threshold,
            )  # fmt: skip
            return int(out.response_mask.sum())

        return call

    def hf() -> int:
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=max_new, pad_token_id=PAD, eos_token_id=EOS,
            )  # fmt: skip
        return response_tokens(seq, prompt_len, EOS)

    return {"ours": ours(0.75), "nocompact": ours(0.0), "hf": hf}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model = build_model(args.family, args.vocab, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"family={args.family} size=small vocab={args.vocab} params={params / 1e6:.2f}M fp32 "
        f"torch_threads={torch.get_num_threads()} torch {torch.__version__} transformers {transformers.__version__}"
    )
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"{args.repeats} interleaved rounds after 1 warm-up, {args.clock} clock; "
        "ratio = ours / HF tokens/s, median [min-max]"
    )
    batches = [int(b) for b in args.batch_sizes.split(",")]
    workloads = args.workloads.split(",")
    for workload in ("sample", "greedy"):
        if workload not in workloads:
            continue
        print(f"\n[{workload}] {args.new_tokens} new tokens forced")
        for batch in batches:
            ids, mask = make_prompts(batch, args.vocab, args.seed)
            calls, outputs = forced_calls(model, ids, mask, args.new_tokens, workload == "sample")
            results = interleaved(calls, args.repeats, clock)
            line = f"  batch {batch:>3}: ours {summary(results, 'ours')}  hf {summary(results, 'hf')[:15]}"
            if workload == "greedy":
                line += f"  same tokens: {torch.equal(outputs['ours'], outputs['hf'])}"
            print(line, flush=True)
    if "varied" in workloads:
        # Random-init logits are near uniform over V, so P(EOS) = e^b / (e^b + V - 1) = 1 / mean_length.
        bias = math.log((args.vocab - 1) / (args.mean_length - 1))
        with_eos_bias(model, bias)
        print(
            f"\n[varied] sampling, EOS bias {bias:.2f} (mean length ~{args.mean_length:g}), "
            f"max_new_tokens={args.max_varied}; tok/s over generated tokens"
        )
        for batch in batches:
            ids, mask = make_prompts(batch, args.vocab, args.seed)
            results = interleaved(varied_calls(model, ids, mask, args.max_varied), args.repeats, clock)
            mean_len = statistics.mean(n for _, n in results["ours"]) / batch
            print(
                f"  batch {batch:>3} (mean length {mean_len:4.1f}): ours {summary(results, 'ours')}  "
                f"nocompact {summary(results, 'nocompact')}  hf {summary(results, 'hf')[:15]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
