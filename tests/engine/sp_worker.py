"""Run by tests/engine/test_sequence_parallel.py on 2 processes: Ulysses SP=2 against full sequences.

`equivalence`: for each config, a TrainEngine with sequence_parallel_size=2 runs a sharded forward and
backward; rank 0 compares gathered logits, loss, scores and full gradients with a plain HF model run
on the whole sequence in the same process. `trainers`: SFTTrainer and RewardTrainer with SP=1 (two
data-parallel ranks) then SP=2 (one data-parallel group) on the same rows; the curves are written out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from chatforge.algorithms import pairwise_loss, policy_loss, position_ids_from_mask, sft_loss, token_logprobs
from chatforge.engine import ModelSpec, TrainEngine, init_distributed
from chatforge.engine.forward import sequence_scores, token_values
from chatforge.engine.sequence_parallel import (
    gather_sequence,
    shard_batch,
    sharded_sft_loss,
    sp_all_reduce,
    sp_model_inputs,
)
from chatforge.models.loading import LoadOptions, load_causal_lm, load_scorer
from chatforge.models.lora import apply_lora

SDPA = LoadOptions(attn_implementation="sdpa")
PROMPT = 5  # the rl case: left-padded prompts of this width, then the response

SEQ = 13  # odd on purpose: shard_batch pads it to 14


def fixed_batch(vocab: int, padding: str) -> dict[str, torch.Tensor]:
    """(3, SEQ): one full row and two shorter rows padded on the `padding` side; loss on the last 2/3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (3, SEQ), generator=g)
    mask = torch.ones_like(ids)
    for row, real in ((1, SEQ - 4), (2, SEQ - 6)):
        span = slice(real, SEQ) if padding == "right" else slice(0, SEQ - real)
        mask[row, span] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, : SEQ // 3] = -100
    # No token predicts a row's first real token (under left padding a pad position would).
    labels[torch.arange(3), mask.argmax(dim=1)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _load(model_dir: str, scorer: bool, dtype):
    return (
        load_scorer(model_dir, SDPA, dtype, 0, heads=1)
        if scorer
        else load_causal_lm(model_dir, SDPA, dtype, 0)
    )


def make_engine(model_dir: str, spec: dict, scorer: bool) -> TrainEngine:
    model_spec = ModelSpec(
        model_dir, zero_stage=spec["stage"], precision="fp32", gradient_clipping=0.0, sequence_parallel_size=2,
        lora_r=spec.get("lora", 0), learning_rate=1e-3,
    )  # fmt: skip
    return TrainEngine(
        lambda dtype: _load(model_dir, scorer, dtype),
        model_spec,
        trainable_heads=("score",) if scorer else (),
    )


def reference_model(model_dir: str, state: dict, spec: dict, scorer: bool) -> torch.nn.Module:
    """A plain, single-process model with the engine's weights (LoRA adapters and fresh heads included)."""
    model = _load(model_dir, scorer, torch.float32)
    if spec.get("lora"):
        model = apply_lora(model, spec["lora"], 2.0 * spec["lora"], ("score",) if scorer else ())
    model.load_state_dict(state)
    return model


def full_grads(engine: TrainEngine) -> dict[str, torch.Tensor]:
    """Unpartitioned gradients of every trainable parameter (a collective under ZeRO-3)."""
    return {
        n: safe_get_full_grad(p).detach().clone()
        for n, p in engine.module.named_parameters()
        if p.requires_grad
    }


def lm_step(engine: TrainEngine, batch: dict) -> dict:
    """Sharded forward + token-weighted backward. One data-parallel group, so the gradient of
    (sum of shard losses) * dp / N summed over the SP ranks is that of the global token mean."""
    local = shard_batch(batch, engine.sp)
    logits = engine(**sp_model_inputs(local)).logits
    loss_sum, count = sharded_sft_loss(logits, local["shift_labels"])
    n_tokens = sp_all_reduce(count.float(), engine.sp)
    engine.backward(loss_sum * engine.sp.dp_world_size / n_tokens)
    logprobs = gather_sequence(token_logprobs(logits, local["shift_input_ids"])[0], engine.sp, SEQ)
    return {
        "logits": gather_sequence(logits.detach(), engine.sp, SEQ),
        "loss": (sp_all_reduce(loss_sum, engine.sp) / n_tokens).item(),
        "logprobs": logprobs.detach()[:, :-1],
    }


def lm_reference(model: torch.nn.Module, batch: dict) -> dict:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    loss_sum, count = sft_loss(logits, batch["labels"])
    (loss_sum / count).backward()
    return {
        "logits": logits.detach(),
        "loss": (loss_sum / count).item(),
        "logprobs": token_logprobs(logits[:, :-1], ids[:, 1:])[0].detach(),
    }


def reward_step(engine: TrainEngine, batch: dict) -> dict:
    """The engine's `scores` verb shards the batch itself under SP."""
    scores = engine.scores(batch["input_ids"], batch["attention_mask"])[:, 0]
    loss, _ = pairwise_loss(*scores.chunk(2))
    engine.backward(loss)
    return {"scores": scores.detach(), "loss": loss.item()}


def reward_reference(model: torch.nn.Module, batch: dict) -> dict:
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])[:, 0]
    loss, _ = pairwise_loss(*scores.chunk(2))
    loss.backward()
    return {"scores": scores.detach(), "loss": loss.item()}


def rl_step(engine: TrainEngine, batch: dict) -> dict:
    """Step 3's verbs under SP on left-padded rollouts: response log-probs at T = 0.8 with entropy, and
    one policy-gradient backward (what an actor mini-batch runs)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp, entropy = engine.logprobs(ids, mask, PROMPT, 0.8, with_entropy=True)
    loss = _rl_loss(logp, mask)
    engine.backward(loss)
    return {"logprobs": logp.detach(), "entropy": entropy, "loss": loss.item()}


def rl_reference(model: torch.nn.Module, batch: dict) -> dict:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp, entropy = token_logprobs(logits[:, PROMPT - 1 : -1], ids[:, PROMPT:], 0.8, with_entropy=True)
    loss = _rl_loss(logp, mask)
    loss.backward()
    return {"logprobs": logp.detach(), "entropy": entropy, "loss": loss.item()}


def _rl_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    advantages = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    return policy_loss(logp, logp.detach() - 0.1, advantages, _real_response(mask), 0.2)[0]


def _real_response(mask: torch.Tensor) -> torch.Tensor:
    """Response positions where the token and the position predicting it are real (a rollout's prompt
    always ends in a real token; the fixed batch may have a left pad at PROMPT - 1)."""
    return mask[:, PROMPT:] * mask[:, PROMPT - 1 : -1]


def value_step(engine: TrainEngine, batch: dict) -> dict:
    values = engine.values(batch["input_ids"], batch["attention_mask"], PROMPT)
    loss = (values * _real_response(batch["attention_mask"])).pow(2).mean()
    engine.backward(loss)
    return {"values": values.detach(), "loss": loss.item()}


def value_reference(model: torch.nn.Module, batch: dict) -> dict:
    values = token_values(model, model, batch["input_ids"], batch["attention_mask"], _NO_SP)[
        :, PROMPT - 1 : -1, 0
    ]
    loss = (values * _real_response(batch["attention_mask"])).pow(2).mean()
    loss.backward()
    return {"values": values.detach(), "loss": loss.item()}


from chatforge.engine.sequence_parallel import SPLayout  # noqa: E402

_NO_SP = SPLayout(1, 0, 0, 1)
STEPS = {
    "lm": (lm_step, lm_reference),
    "reward": (reward_step, reward_reference),
    "rl": (rl_step, rl_reference),
    "value": (value_step, value_reference),
}


def max_diffs(ours: dict, want: dict, mask: torch.Tensor, kind: str) -> dict[str, float]:
    """Largest absolute differences; logits and log-probs only where the model reads a real token
    (outputs at padding differ by design: Ulysses never builds the padding mask causal attention ignores)."""
    response = _real_response(mask).bool()
    real = {"logits": mask.bool(), "logprobs": (mask[:, 1:] * mask[:, :-1]).bool()}
    if kind in ("rl", "value"):
        real = {"logprobs": response, "entropy": response, "values": response}
    out = {}
    for key, value in want.items():
        if key in real:
            out[key] = (ours[key] - value).abs()[real[key]].max().item()
        elif torch.is_tensor(value):
            out[key] = (ours[key] - value).abs().max().item()
        else:
            out[key] = abs(ours[key] - value)
    return out


def run_case(model_dir: str, spec: dict, padding: str, is_main: bool) -> dict | None:
    scorer = spec["kind"] in ("reward", "value")
    engine = make_engine(model_dir, spec, scorer)
    with engine.gathered() as full:  # collective under ZeRO-3: every rank takes part
        state = {k: v.detach().clone() for k, v in full.state_dict().items()}
    ref = reference_model(model_dir, state, spec, scorer) if is_main else None
    batch = fixed_batch(engine.module.config.vocab_size, padding)
    if spec["kind"] == "reward":
        batch = {k: torch.cat([v, v.flip(0)]) for k, v in batch.items() if k != "labels"}
    step, reference = STEPS[spec["kind"]]
    ours = step(engine, batch)
    grads = full_grads(engine)
    if not is_main:
        return None
    want = reference(ref, batch)
    want_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    diffs = max_diffs(ours, want, batch["attention_mask"], spec["kind"])
    assert grads.keys() == want_grads.keys(), (sorted(grads)[:3], sorted(want_grads)[:3])
    diffs["grad"] = max((grads[n] - want_grads[n]).abs().max().item() for n in grads)
    diffs["grad_scale"] = max(g.abs().max().item() for g in want_grads.values())
    diffs["loss_value"] = want["loss"]
    return diffs


def cmd_equivalence(args) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    results = {}
    for name in args.cases.split(","):
        family, kind, stage, lora, padding = name.split("-")
        model_dir = str(Path(args.fixtures) / (f"reward-{family}" if kind in ("reward", "value") else family))
        spec = {"kind": kind, "stage": int(stage[1:]), "lora": int(lora[4:])}
        results[name] = run_case(model_dir, spec, padding, info.is_main)
    if info.is_main:
        Path(args.out).write_text(json.dumps(results, indent=1))


def trainer_config(args, step: str, sp: int, out_dir: Path):
    """The same 4 rows per optimizer step for SP=1 (2 data-parallel ranks) and SP=2 (1 group)."""
    from chatforge.config import RewardConfig, SFTConfig, from_dict

    micro = 4 // (2 // sp)
    family = args.family if step == "sft" else f"reward-{args.family}"
    return from_dict(SFTConfig if step == "sft" else RewardConfig, {
        "model": {"name_or_path": str(Path(args.fixtures) / family), "zero_stage": args.stage, "learning_rate": 2e-3},
        "data": {"datasets": [args.data], "data_split": [1.0, 1.0, 0.0], "eval_fraction": 0.1,
                 "max_prompt_length": 64, "max_length": 96},
        "engine": {"precision": "fp32", "sequence_parallel_size": sp, "attn_implementation": "sdpa"},
        "optim": {"lr_scheduler": "constant"},
        "batch": {"micro_batch_size": micro, "gradient_accumulation_steps": 2},
        "train": {"output_dir": str(out_dir / f"{step}-sp{sp}"), "max_steps": args.steps, "report_to": ["none"]},
    })  # fmt: skip


def cmd_trainers(args) -> None:
    """SFTTrainer and RewardTrainer with SP=1, then SP=2 (the first SP=2 engine fixes DeepSpeed's
    process-wide layout, so SP=1 training must come first); writes each run's curves."""
    from chatforge.trainers.reward import RewardTrainer
    from chatforge.trainers.run_dir import read_metrics
    from chatforge.trainers.sft import SFTTrainer

    info = init_distributed()
    curves = {}
    for sp in (1, 2):
        for step, trainer_cls in (("sft", SFTTrainer), ("reward", RewardTrainer)):
            trainer = trainer_cls(trainer_config(args, step, sp, Path(args.work)))
            final = trainer.fit()
            train = [r for r in read_metrics(trainer.run.metrics) if r["phase"] == "train"]
            curves[f"{step}-sp{sp}"] = {
                "loss": [r["loss"] for r in train],
                "grad_norm": [r.get("grad_norm") for r in train],
                "final": final,
            }
    if info.is_main:
        Path(args.out).write_text(json.dumps(curves, indent=1))


def main() -> None:
    torch.use_deterministic_algorithms(True)
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("equivalence", "trainers"))
    p.add_argument("--fixtures", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="llama-lm-z0-lora0-right")
    p.add_argument("--data", default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--family", default="llama")
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    {"equivalence": cmd_equivalence, "trainers": cmd_trainers}[args.command](args)


if __name__ == "__main__":
    main()
