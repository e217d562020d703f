"""Run by tests/engine/test_hybrid.py under 1 or 2 processes: rollouts in the actor's inference mode.

Writes one JSON with, per engine config: the generated tokens (same seed on every rank), DeepSpeed
collectives counted during rollouts of two lengths, the engine's gather count, and whether the
training weights are bit-identical after the rollout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from collectives import count_collectives  # beside this script (run by path)

from chatforge.config.schema import GenerationConfig
from chatforge.engine import ModelSpec, TrainEngine, init_distributed
from chatforge.engine.hybrid import inference_mode
from chatforge.generation import generate
from chatforge.models.loading import LoadOptions, load_causal_lm

BATCH, PROMPT = 4, 6


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompts: row i has i pads."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (BATCH, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row in range(BATCH):
        mask[row, :row] = 0
        ids[row, :row] = 0
    return ids, mask


def local_weights(engine: TrainEngine) -> dict[str, torch.Tensor]:
    """This rank's stored copy of every parameter: the ZeRO-3 shard (plus the full tensor of params
    ZeRO-3 keeps resident), or the tensor itself below stage 3."""
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            out[name + "#shard"] = p.ds_tensor.detach().clone()
        if not hasattr(p, "ds_tensor") or p.ds_persist:
            out[name] = p.detach().clone()
    return out


def training_mode_of_next_forward(engine: TrainEngine, ids: torch.Tensor) -> bool:
    """The mode a graph-building forward runs in after a rollout (the engine sets it per forward)."""
    seen = []
    handle = engine.module.register_forward_pre_hook(lambda module, _args: seen.append(module.training))
    try:
        engine(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def count_gathers(engine: TrainEngine) -> list[int]:
    """Count the engine's one-shot gathers (`engine.gathered()` calls) in a one-item list."""
    calls, original = [0], engine.gathered

    def counted():
        calls[0] += 1
        return original()

    engine.gathered = counted
    return calls


def train_one_step(engine: TrainEngine, ids: torch.Tensor) -> None:
    """So that LoRA's B matrices are non-zero and a merge really changes the weights."""
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def sample(model, ids, mask, eos: int, new_tokens: int) -> list[list[int]]:
    """(B, A) sampled response tokens (0 after a row stopped), seed 7, top-k 50."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, top_k=50)
    out = generate(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=0,
                   generator=torch.Generator().manual_seed(7))  # fmt: skip
    return (out.sequences[:, PROMPT:] * out.response_mask).tolist()


def rollout(engine: TrainEngine, ids, mask, eos: int, new_tokens: int) -> tuple[list, dict]:
    with count_collectives() as counts, inference_mode(engine) as model, count_collectives() as inside:
        tokens = sample(model, ids, mask, eos, new_tokens)
    return tokens, {"total": sum(counts.values()), "during_generate": sum(inside.values())}


def reference_tokens(engine: TrainEngine, out_dir: Path, ids, mask, eos: int, lengths: list[int]) -> list:
    """The same sampling with the exported (gathered, LoRA-merged) model as a plain HF model, no DeepSpeed."""
    engine.save_hf(out_dir)
    plain = load_causal_lm(str(out_dir), LoadOptions(), torch.float32)
    with torch.no_grad():
        return [sample(plain, ids, mask, eos, n) for n in lengths]


def unbypassed_counts(engine: TrainEngine, ids, mask, eos: int) -> list[int]:
    """Negative control: generating inside a plain gather, with DeepSpeed's hooks left on, issues
    collectives during generation that grow with the number of tokens (every rank runs equal lengths)."""
    counts = []
    for new_tokens in (2, 6, 12):  # the first call also pays one-time broadcasts: compare the last two
        cfg = GenerationConfig(max_new_tokens=new_tokens)
        # Each call starts from a fresh ZeRO-3 module trace (as after a training phase), so only the
        # number of tokens differs between the two.
        engine._set_mode(True)
        engine._set_mode(False)
        with torch.no_grad(), engine.gathered() as model, count_collectives() as inside:
            generate(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=0,
                     generator=torch.Generator().manual_seed(7))  # fmt: skip
        counts.append(sum(inside.values()))
    return counts[1:]


def run_config(model_dir: str, spec: str, info, no_persistence: str, out: str) -> dict:
    stage, _, lora = spec.partition("+lora")
    model_spec = ModelSpec(
        model_dir, zero_stage=int(stage), lora_r=int(lora or 0), deepspeed_config=no_persistence,
        precision="fp32", learning_rate=1e-2,
    )  # fmt: skip
    engine = TrainEngine(
        lambda dtype: load_causal_lm(model_dir, LoadOptions(), dtype), model_spec, micro_batch_size=BATCH
    )
    gathers = count_gathers(engine)
    ids, mask = prompts(engine.module.config.vocab_size)
    train_one_step(engine, ids)
    # A token id that never ends a row early, so every rank runs the full max_new_tokens.
    eos = engine.module.config.vocab_size + 1
    with count_collectives() as plain:
        engine(input_ids=ids, attention_mask=mask)  # a training-mode forward, as a positive control
    rollout(engine, ids, mask, eos, 2)  # warm-up: later rollouts start from the same ZeRO-3 state
    before = local_weights(engine)
    gathers_before = gathers[0]
    short_tokens, short = rollout(engine, ids, mask, eos, 4)
    # Ranks generate different lengths: legal only because nothing inside the rollout is collective.
    long_new = 12 + 4 * info.rank
    long_tokens, long = rollout(engine, ids, mask, eos, long_new)
    after = local_weights(engine)
    gathers_after = gathers[0]
    unbypassed = unbypassed_counts(engine, ids, mask, eos) if model_spec.zero_stage == 3 else None
    ref_short, ref_long = reference_tokens(engine, Path(f"{out}-{spec}"), ids, mask, eos, [4, long_new])
    identical = all(torch.equal(before[k], after[k]) for k in before)
    return {
        "unbypassed": unbypassed,
        "short_tokens": short_tokens,
        "long_tokens": long_tokens,
        "reference_short_tokens": ref_short,
        "reference_long_tokens": ref_long,
        "collectives_plain_forward": sum(plain.values()),
        "collectives_short": short,
        "collectives_long": long,
        "gathers_per_rollout": (gathers_after - gathers_before) / 2,
        "weights_identical": identical,
        "training_after": training_mode_of_next_forward(engine, ids),
    }


def main() -> None:
    torch.use_deterministic_algorithms(True)
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="0")
    args = p.parse_args()
    info = init_distributed()
    # ZeRO-3 keeps params under a size threshold resident; at 0 every tiny-model param is fetched and
    # released per module, as a real model's would be.
    no_persistence = f"{args.out}.rank{info.rank}.ds.json"
    Path(no_persistence).write_text(
        json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    )
    results = {
        spec: run_config(args.model, spec, info, no_persistence, args.out) for spec in args.configs.split(",")
    }
    Path(f"{args.out}.rank{info.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
