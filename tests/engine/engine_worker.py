"""Run by tests/engine under 1 or 2 processes: train tiny models with TrainEngine and report results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from chatforge.engine import ModelSpec, TrainEngine, init_distributed
from chatforge.models.loading import LoadOptions, load_causal_lm

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3


def fixed_batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (GLOBAL_BATCH, SEQ), generator=g)


def make_engine(model_dir: str, world: int, accumulation: int = 1, **spec) -> TrainEngine:
    def factory(dtype):
        return load_causal_lm(model_dir, LoadOptions(), dtype)

    micro = GLOBAL_BATCH // world // accumulation
    spec = ModelSpec(model_dir, precision="fp32", learning_rate=1e-3, **spec)
    return TrainEngine(
        factory, spec, micro_batch_size=micro, gradient_accumulation_steps=accumulation, total_steps=STEPS
    )


def train_steps(engine: TrainEngine, batch: torch.Tensor, steps: int, accumulation: int = 1) -> list[float]:
    """Each rank trains on its slice; returns the global mean loss per optimizer step."""
    world, rank = engine.dist.world_size, engine.dist.rank
    mine = batch.chunk(world)[rank].chunk(accumulation)
    losses = []
    for _ in range(steps):
        total = torch.zeros(())
        for micro in mine:
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach() / accumulation
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def cmd_losses(args) -> None:
    info = init_distributed()
    results = {}
    for spec in args.configs.split(","):
        stage, _, extra = spec.partition("+")
        engine = make_engine(args.model, info.world_size, zero_stage=int(stage), offload=extra == "offload")
        results[spec] = train_steps(engine, fixed_batch(engine.module.config.vocab_size), STEPS)
        if args.save_dir:
            engine.save_hf(Path(args.save_dir) / spec)
    if info.is_main:
        Path(args.out).write_text(json.dumps(results))


def cmd_resume(args) -> None:
    """Train 2 steps, checkpoint, train 1 more; then a fresh engine loads the checkpoint and trains 1."""
    info = init_distributed()
    cfg = {"zero_stage": args.stage, "lora_r": args.lora}
    engine = make_engine(args.model, info.world_size, **cfg)
    batch = fixed_batch(engine.module.config.vocab_size)
    train_steps(engine, batch, 2)
    engine.save_checkpoint(args.ckpt, tag="step2", client_state={"step": 2})
    expected = train_steps(engine, batch, 1)
    fresh = make_engine(args.model, info.world_size, **cfg)
    state = fresh.load_checkpoint(args.ckpt)
    resumed = train_steps(fresh, batch, 1)
    if info.is_main:
        Path(args.out).write_text(
            json.dumps({"expected": expected, "resumed": resumed, "state": {"step": state["step"]}})
        )


def cmd_lora(args) -> None:
    """Train with LoRA, export merged and as adapter; report logits of the engine and of both reloads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = init_distributed()
    engine = make_engine(args.model, info.world_size, zero_stage=args.stage, lora_r=4)
    batch = fixed_batch(engine.module.config.vocab_size)
    train_steps(engine, batch, 2)
    out = Path(args.save_dir)
    engine.save_hf(out / "merged")
    engine.save_hf(out / "adapter", adapter=True)
    with engine.gathered() as model, torch.no_grad():
        trained = model(input_ids=batch).logits
    if info.is_main:
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        base = AutoModelForCausalLM.from_pretrained(args.model).eval()
        with torch.no_grad():
            untrained = base(input_ids=batch).logits
        # PeftModel injects the adapter into `base` in place, so the base logits are taken first.
        adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
        with torch.no_grad():
            diffs = {
                "merged": (merged(input_ids=batch).logits - trained).abs().max().item(),
                "adapter": (adapter(input_ids=batch).logits - trained).abs().max().item(),
                "untrained": (untrained - trained).abs().max().item(),
            }
        Path(args.out).write_text(json.dumps(diffs))


def main() -> None:
    torch.use_deterministic_algorithms(True)
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("losses", "resume", "lora"))
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="0")
    p.add_argument("--save-dir", default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--lora", type=int, default=0)
    args = p.parse_args()
    {"losses": cmd_losses, "resume": cmd_resume, "lora": cmd_lora}[args.command](args)


if __name__ == "__main__":
    main()
